"""Register the six deployments with the Prefect server at PREFECT_API_URL and serve them.

    PREFECT_API_URL=http://127.0.0.1:4200/api python -m deployments.serve --landing landing/

- `training-pipeline/scheduled`: the training pipeline on a cron schedule (SageMaker: a scheduled
  pipeline execution).
- `drift-monitor/landing-folder`: the monitor on a schedule, over the newest file of the landing
  folder (Model Monitor's monitoring schedule); `--policy` decides which batches call for a retrain.
- `retrain/on-drift`: the retrain flow, started by an automation on every `keel.drift.detected`
  event (a batch whose policy called for a retrain) about any model (EventBridge rule -> Lambda),
  and by another on every `keel.quality.dropped` event (late labels showed the champion's realized
  metric outside its range: `python -m flows.label`).
  The event's model name, id, policy, reasons and report URI become the flow's parameters; the flow
  itself keeps one retrain per model at a time and honours the cooldown, so a burst of events
  retrains once.
- `await-approval/on-pending`: started by an automation on every `keel.model.pending-approval` event
  (a pipeline registered a version as PendingManualApproval). The flow run pauses with a form in
  Prefect's UI (approve or reject, and why) for `--approval-timeout-minutes`; the answer is applied as
  `python -m flows.approve` applies it (SageMaker Studio's approval, with its state-change event).

- `score-pending/hourly`: the batches waiting in the scoring inbox (`--scoring-inbox`) scored with
  the champion, on a schedule (`--scoring-cron`); outputs under `--scoring-outbox` (SageMaker's
  batch transform on a schedule).
- `score-pending/on-approval`: the same, started by an automation on every `keel.model.approved`
  event, so an approved version scores what waits at once (deploy on approval).
  Both only with local folders (the outputs are renamed into place): with a landing folder that is
  a URL and no `--scoring-inbox`/`--scoring-outbox`, they are left out.

This process runs the flow runs itself (a Prefect runner): stop it with SIGTERM (Ctrl-C).

Deployments and the automation are updated in place, never re-created: their ids, and so every
link to them from earlier flow runs, survive restarts and changed settings.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from uuid import UUID

from pydantic import BaseModel, Field, model_validator

from flows.approve import DEFAULT_TIMEOUT_MINUTES, MAX_TIMEOUT_MINUTES, await_approval
from flows.monitor import MonitorParams, monitor
from flows.pipeline import PipelineParams, training_pipeline
from flows.retrain import RetrainParams, retrain
from flows.score_pending import ScorePendingParams, score_pending
from tasks.monitoring.policies import DEFAULT_POLICY, POLICY_HELP, PolicyText
from tasks.steps.cli import build_parser, parse_params
from tasks.steps.model import MODEL_NAME_HELP, ModelName
from tasks.steps.tags import (
    DRIFT_DETECTED_EVENT,
    MODEL_APPROVED_EVENT,
    MODEL_NAME_TAG,
    MODEL_PENDING_EVENT,
    MODEL_VERSION_TAG,
    QUALITY_DROPPED_EVENT,
)
from tasks.tabular.project import configured_model_name, require_model_name

TRAINING = "scheduled"
MONITOR = "landing-folder"
RETRAIN = "on-drift"
APPROVAL = "on-pending"
AUTOMATION = "retrain on drift"
QUALITY_AUTOMATION = "retrain on quality drop"
APPROVAL_AUTOMATION = "ask for approval"
SCORING = "hourly"
SCORING_ON_APPROVAL = "on-approval"
SCORING_AUTOMATION = "score with the approved version"


class ServeSettings(BaseModel):
    """What the deployments run on; every field is a flag of `python -m deployments.serve`."""

    landing: str = Field(description="Folder where new labelled batches land (monitored and retrained on).")
    model_name: ModelName | None = Field(
        default=None,
        description=f"Registered model the deployments look after (default: keel.toml's): {MODEL_NAME_HELP}.",
    )
    target: str | None = Field(
        default=None,
        description="The landing data's column to predict, for scheduled training (or keel.toml).",
    )
    time_column: str | None = Field(
        default=None, description="The landing data's time column, for scheduled training (or keel.toml)."
    )
    key_columns: list[str] | None = Field(
        default=None, description="Columns that identify a row (default: keel.toml's, else the time column)."
    )
    drop_columns: list[str] | None = Field(
        default=None, description="Columns never used as features (default: keel.toml's, else none)."
    )
    training_cron: str = Field(
        default="0 3 * * 1", description="When the training pipeline runs (cron, UTC)."
    )
    monitor_cron: str = Field(
        default="0 * * * *", description="When the monitor checks the landing folder (cron)."
    )
    window_days: int = Field(
        default=120, ge=1, description="Retrain on the last N days of the landing folder."
    )
    cooldown_minutes: float = Field(
        default=60, ge=0, description="Ignore drift events this soon after a retrain."
    )
    n_trials: int = Field(default=16, ge=1, description="Tuning trials of scheduled trainings and retrains.")
    policy: PolicyText = Field(default=DEFAULT_POLICY, description=f"Of the monitor. {POLICY_HELP}")
    approval_timeout_minutes: float = Field(
        default=DEFAULT_TIMEOUT_MINUTES,
        gt=0,
        le=MAX_TIMEOUT_MINUTES,
        description="How long an approval form waits; then the version stays PendingManualApproval.",
    )
    scoring_inbox: str | None = Field(
        default=None,
        description="Folder of batches the champion scores (default: to-score/ beside the landing folder).",
    )
    scoring_outbox: str | None = Field(
        default=None,
        description="Folder the scored batches go to (default: scored/ beside the landing folder).",
    )
    scoring_cron: str = Field(default="30 * * * *", description="When the waiting batches are scored (cron).")
    max_concurrent_retrains: int = Field(
        default=2,
        ge=1,
        le=64,
        description="Retrain runs at once, over all models; more wait for a slot (a burst of events queues).",
    )

    @model_validator(mode="before")
    @classmethod
    def _project_model(cls, values: Any) -> Any:
        return configured_model_name(values)

    @model_validator(mode="after")
    def _model_named(self) -> ServeSettings:
        require_model_name(self.model_name, "look after")
        return self


def _training_params(settings: ServeSettings) -> PipelineParams:
    """The scheduled training's parameters. Scheduled training runs on a landing folder that grows:
    data that moved only warns. The table's columns come from the flags or keel.toml; made (and so
    checked) before anything starts, so a missing one stops serve."""
    return PipelineParams(
        data=_landing(settings),
        model_name=settings.model_name,
        n_trials=settings.n_trials,
        on_quality_violation="fail-on-broken",
        **settings.model_dump(
            include={"target", "time_column", "key_columns", "drop_columns"}, exclude_none=True
        ),
    )


def _landing(settings: ServeSettings) -> str:
    return (
        settings.landing if "://" in settings.landing else str(Path(settings.landing).expanduser().resolve())
    )


def _scoring_params(settings: ServeSettings) -> dict | None:
    """The scoring deployments' parameters, or None when they cannot run here: their outputs must be
    a local folder the Dask workers share (an object store has no atomic rename), so with a landing
    folder that is a URL and no `--scoring-inbox`/`--scoring-outbox`, there are none."""
    beside = None if "://" in settings.landing else Path(_landing(settings)).parent
    inbox = settings.scoring_inbox or (str(beside / "to-score") if beside else None)
    outbox = settings.scoring_outbox or (str(beside / "scored") if beside else None)
    if inbox is None or outbox is None:
        return None
    for flag, folder in (("--scoring-inbox", inbox), ("--scoring-outbox", outbox)):
        if "://" in folder:
            raise ValueError(f"{flag} must be a local folder (shared with the Dask workers), not {folder!r}")
    return ScorePendingParams(
        model_name=settings.model_name,
        inbox=str(Path(inbox).expanduser().resolve()),
        outbox=str(Path(outbox).expanduser().resolve()),
    ).model_dump(mode="json")


def _retrain_params(settings: ServeSettings) -> dict:
    return RetrainParams(
        data=_landing(settings),
        model_name=settings.model_name,
        window_days=settings.window_days,
        cooldown_minutes=settings.cooldown_minutes,
        n_trials=settings.n_trials,
    ).model_dump(mode="json", exclude_none=True)  # unset columns: the champion's (not null)


def build_deployments(settings: ServeSettings) -> list:
    """The four RunnerDeployments (nothing is sent to the server until they are applied or served).
    The retrain and approval deployments are triggered by automations of their own (`_unowned`): Prefect
    deletes and re-creates the triggers a deployment owns each time it is applied."""
    landing = _landing(settings)
    training_params = _training_params(settings)
    monitor_params = MonitorParams(
        batch=landing, latest=True, model_name=settings.model_name, policy=settings.policy
    )
    retrain_params = _retrain_params(settings)
    deployments = [
        training_pipeline.to_deployment(
            name=TRAINING,
            cron=settings.training_cron,
            parameters={"params": training_params.model_dump(mode="json")},
            description="The training pipeline on the landing folder, on a schedule.",
        ),
        monitor.to_deployment(
            name=MONITOR,
            cron=settings.monitor_cron,
            parameters={"params": monitor_params.model_dump(mode="json")},
            description="Drift check of the newest batch in the landing folder against the champion.",
        ),
        retrain.to_deployment(
            name=RETRAIN,
            concurrency_limit=settings.max_concurrent_retrains,
            parameters={"params": retrain_params},
            description="Retrain when drift is detected; promote only a better challenger.",
        ),
        await_approval.to_deployment(
            name=APPROVAL,
            description="A form in Prefect's UI for a version waiting for approval: approve or reject it.",
        ),
    ]
    scoring = _scoring_params(settings)
    if scoring is None:
        return deployments
    return [
        *deployments,
        score_pending.to_deployment(
            name=SCORING,
            cron=settings.scoring_cron,
            parameters={"params": {**scoring, "trigger": "schedule"}},
            description="The batches waiting in the scoring inbox, scored with the champion.",
        ),
        score_pending.to_deployment(
            name=SCORING_ON_APPROVAL,
            parameters={"params": scoring},
            description="The batches waiting in the scoring inbox, scored with a version just approved.",
        ),
    ]


def drift_automation(settings: ServeSettings, retrain_deployment: UUID):
    """The automation that runs retrain/on-drift for each `keel.drift.detected` event (EventBridge
    rule -> target)."""
    return _retrain_automation(settings, retrain_deployment, AUTOMATION, DRIFT_DETECTED_EVENT)


def quality_automation(settings: ServeSettings, retrain_deployment: UUID):
    """The automation that runs retrain/on-drift for each `keel.quality.dropped` event: late labels
    showed the champion's realized metric outside its range (`python -m flows.label`)."""
    return _retrain_automation(settings, retrain_deployment, QUALITY_AUTOMATION, QUALITY_DROPPED_EVENT)


def _retrain_automation(settings: ServeSettings, retrain_deployment: UUID, name: str, event: str):
    """`event` about any model starts a retrain of that model, with the event's policy, reasons,
    id and report as the flow's parameters (both events carry them)."""
    from prefect.events import DeploymentEventTrigger

    return _unowned(
        DeploymentEventTrigger(
            name=name,
            description=f"{event} about any registered model starts retrain/{RETRAIN} for that model",
            expect={event},
            match={"prefect.resource.id": "keel.model.*"},
            parameters={
                "params": {
                    **_retrain_params(settings),
                    "model_name": _FROM_EVENT_NAME,
                    "reason": "policy {{ event.payload.policy }} on "
                    f"v{_FROM_EVENT_VERSION}: "
                    "{{ event.payload.reasons | join('; ') | truncate(420) }}",  # the flow takes 500 characters
                    "event_id": "{{ event.id | string }}",
                    "drift_report": "{{ event.payload.report_uri | default('') }}",  # absent: no report, still a run
                }
            },
        ),
        retrain_deployment,
    )


def approval_automation(settings: ServeSettings, approval_deployment: UUID):
    """The automation that runs await-approval/on-pending for each version registered as
    PendingManualApproval."""
    from prefect.events import DeploymentEventTrigger

    return _unowned(
        DeploymentEventTrigger(
            name=APPROVAL_AUTOMATION,
            description=f"{MODEL_PENDING_EVENT} about any registered model starts await-approval/{APPROVAL}",
            expect={MODEL_PENDING_EVENT},
            match={"prefect.resource.id": "keel.model.*"},
            parameters={
                "params": {
                    "model_name": _FROM_EVENT_NAME,
                    "version": _FROM_EVENT_VERSION,
                    "timeout_minutes": settings.approval_timeout_minutes,
                }
            },
        ),
        approval_deployment,
    )


def scoring_automation(scoring: dict, scoring_deployment: UUID):
    """The automation that runs score-pending/on-approval for each approved version (the model it
    names; the flow scores with that model's champion, which an approval without --no-promote is)."""
    from prefect.events import DeploymentEventTrigger

    return _unowned(
        DeploymentEventTrigger(
            name=SCORING_AUTOMATION,
            description=f"{MODEL_APPROVED_EVENT} about any registered model starts score-pending/{SCORING_ON_APPROVAL}",
            expect={MODEL_APPROVED_EVENT},
            match={"prefect.resource.id": "keel.model.*"},
            parameters={
                "params": {
                    **scoring,
                    "model_name": _FROM_EVENT_NAME,
                    "trigger": f"v{_FROM_EVENT_VERSION} approved: "
                    "{{ event.payload.reason | truncate(300) }}",
                }
            },
        ),
        scoring_deployment,
    )


_FROM_EVENT_NAME = f"{{{{ event.resource['{MODEL_NAME_TAG}'] }}}}"
_FROM_EVENT_VERSION = f"{{{{ event.resource['{MODEL_VERSION_TAG}'] }}}}"


def _unowned(trigger, deployment: UUID):
    """The trigger as an automation of its own, related to the deployment through its action but not
    owned by it: Prefect deletes and re-creates the triggers a deployment owns each time it is
    applied (and the update API refuses the owner field altogether)."""
    from prefect.events.schemas.automations import AutomationCore

    trigger.set_deployment_id(deployment)
    return AutomationCore.model_validate(trigger.as_automation().model_dump(exclude={"owner_resource"}))


def apply_all(settings: ServeSettings, deployments: list) -> dict[str, UUID]:
    """Create or update the deployments (by name) and the automations (by name); the automations' ids."""
    from prefect.client.orchestration import get_client

    ids = {deployment.name: deployment.apply() for deployment in deployments}
    automations = {
        AUTOMATION: drift_automation(settings, ids[RETRAIN]),
        QUALITY_AUTOMATION: quality_automation(settings, ids[RETRAIN]),
        APPROVAL_AUTOMATION: approval_automation(settings, ids[APPROVAL]),
    }
    scoring = _scoring_params(settings)
    if scoring is not None:
        automations[SCORING_AUTOMATION] = scoring_automation(scoring, ids[SCORING_ON_APPROVAL])
    out: dict[str, UUID] = {}
    with get_client(sync_client=True) as client:
        for name, automation in automations.items():
            existing = client.read_automations_by_name(name)
            if not existing:
                out[name] = client.create_automation(automation)
                continue
            keep, *extra = sorted(existing, key=lambda a: str(a.id))
            client.update_automation(keep.id, automation)
            for duplicate in extra:  # left by an older version of this module, or a race of two servers
                client.delete_automation(duplicate.id)
            out[name] = keep.id
    return out


def main(argv: Sequence[str] | None = None) -> int:
    prog = "python -m deployments.serve"
    settings = parse_params(
        ServeSettings, argv, prog, __doc__ or "", check=lambda s: (_training_params(s), _scoring_params(s))
    )
    if not os.environ.get("PREFECT_API_URL"):
        build_parser(ServeSettings, prog, __doc__ or "").error(
            "PREFECT_API_URL is not set: deployments need a Prefect server "
            "(start the stack with `python -m infra.stack up`, or `prefect server start`)"
        )
    if "://" not in settings.landing:
        Path(settings.landing).expanduser().mkdir(parents=True, exist_ok=True)
    scoring = _scoring_params(settings)
    for folder in (scoring["inbox"], scoring["outbox"]) if scoring else ():
        Path(folder).mkdir(parents=True, exist_ok=True)
    from prefect import serve

    from tasks.steps.cli import configure_logging

    configure_logging()
    deployments = build_deployments(settings)
    apply_all(settings, deployments)
    serve(*deployments)
    return 0


if __name__ == "__main__":
    sys.exit(main())
