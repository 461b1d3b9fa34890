"""Approve or reject a registered model version: on the command line, or in a form in Prefect's UI.

    python -m flows.approve MODEL VERSION --approve --reason "card and backtest checked"
    python -m flows.approve MODEL VERSION --reject --reason "worse on holiday weeks"
    python -m flows.approve MODEL VERSION --wait --timeout-minutes 1440

A decision sets the version's `approval_status` (Approved or Rejected) and records who, when and why
on it (tags `approval.*` and a line on its model card). Approving moves `champion` to the version
unless `--no-promote`. Rejecting the champion is refused; approving a Rejected version needs
`--force`. Each decision emits `keel.model.approved` or `keel.model.rejected` about the version, with
the reason and the previous champion, to the Prefect server at PREFECT_API_URL (without one, no event
is sent, and the command says so). An unknown model or version, or an illegal transition, exits 2
and changes nothing.

`--wait` starts the flow run `await-approval` on the Prefect server instead: it pauses with a form
(approve or reject, a reason, your name) that Prefect's UI shows on the flow run page ("Resume").
The answer is applied exactly as on the command line. When `--timeout-minutes` pass without one, the
version stays PendingManualApproval and its `approval.waiting` tag says so. `deployments.serve`
starts this flow by itself for every version a pipeline registers as PendingManualApproval.
"""

from __future__ import annotations

if __name__ == "__main__":  # with the warm pool, its runner runs this command: libraries already imported
    from infra.runner import hand_off

    hand_off(__spec__)

import argparse
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Literal

from prefect import flow, get_run_logger
from prefect.input import RunInput
from pydantic import BaseModel, Field

from tasks.steps import markdown
from tasks.steps.approval import ApprovalRecord, ApprovalRefused, decide_version, find_version
from tasks.steps.cli import exit_process
from tasks.steps.model import MODEL_NAME_HELP, ModelName
from tasks.steps.tags import APPROVAL_TAG, APPROVAL_WAIT_TAG

PROG = "python -m flows.approve"
DEFAULT_TIMEOUT_MINUTES = 24 * 60.0
MAX_TIMEOUT_MINUTES = 30 * 24 * 60.0
POLL_SECONDS = 1  # how soon a decision in the UI is applied (Prefect's default is 10 s)


class ApprovalForm(RunInput):
    """The form Prefect's UI shows on the paused `await-approval` flow run."""

    decision: Literal["approve", "reject"] = Field(
        description="approve: the version becomes Approved (and champion); reject: Rejected."
    )
    reason: str = Field(min_length=1, description="Why: recorded on the version and sent with the event.")
    decided_by: str = Field(
        default="",
        description="Your name, for the record (Prefect's open-source UI does not say who you are).",
    )
    promote: bool = Field(default=True, description="On approval, move the champion alias to this version.")


class AwaitApprovalParams(BaseModel):
    model_config = {"coerce_numbers_to_str": True}  # MLflow hands versions out as numbers or text

    model_name: ModelName = Field(description=f"Registered model: {MODEL_NAME_HELP}.")
    version: str = Field(pattern=r"^[1-9][0-9]{0,9}$", description="The version waiting for a decision.")
    timeout_minutes: float = Field(
        default=DEFAULT_TIMEOUT_MINUTES,
        gt=0,
        le=MAX_TIMEOUT_MINUTES,
        description="How long the form waits; then the version stays PendingManualApproval.",
    )


class AwaitApprovalResult(BaseModel):
    outcome: Literal["decided", "timed-out", "already-decided"]
    status: str
    record: ApprovalRecord | None = None


def _client():
    from tasks.steps.lineage import mlflow_client
    from tasks.steps.settings import get_settings

    return mlflow_client(get_settings())


@flow(name="await-approval", log_prints=False)
def await_approval(params: AwaitApprovalParams) -> AwaitApprovalResult:
    """Pause with a decision form until a person answers in Prefect's UI (or the timeout passes)."""
    from prefect.runtime import flow_run

    logger = get_run_logger()
    client = _client()
    name, version = params.model_name, params.version
    status = find_version(client, name, version).tags.get(APPROVAL_TAG, "none")
    if status != "PendingManualApproval":
        logger.info("%s v%s is %s already: nothing to decide", name, version, status)
        return AwaitApprovalResult(outcome="already-decided", status=status)
    until = datetime.now(UTC) + timedelta(minutes=params.timeout_minutes)
    client.set_model_version_tag(
        name,
        version,
        APPROVAL_WAIT_TAG,
        f"form on Prefect flow run {flow_run.name} until {until:%Y-%m-%d %H:%M} UTC",
    )
    note = ""
    while True:  # a refused answer (e.g. rejecting the champion) asks again, saying why
        answer = _ask(name, version, note, until)
        if answer is None:
            note = f"no decision by {until:%Y-%m-%d %H:%M} UTC: stays PendingManualApproval"
            client.set_model_version_tag(name, version, APPROVAL_WAIT_TAG, note)
            logger.warning(
                "%s v%s: %s (decide with %s %s %s --approve|--reject)",
                name,
                version,
                note,
                PROG,
                name,
                version,
            )
            return AwaitApprovalResult(outcome="timed-out", status="PendingManualApproval")
        who = f"{answer.decided_by.strip() or 'someone'} (Prefect UI, flow run {flow_run.name})"
        try:
            record = decide_version(
                client, name, version, answer.decision, answer.reason, who, promote=answer.promote
            )
        except ApprovalRefused as exc:
            note = f"The last answer was refused, nothing changed: {exc}"
            logger.warning("%s", note)
            continue
        client.set_model_version_tag(
            name, version, APPROVAL_WAIT_TAG, f"decided in Prefect flow run {flow_run.name}"
        )
        logger.info("%s", record.line())
        return AwaitApprovalResult(outcome="decided", status=record.status, record=record)


def _ask(name: str, version: str, note: str, until: datetime) -> ApprovalForm | None:
    """Pause the flow run with the form until `until`; the answer, or None when the time is up."""
    from prefect.exceptions import FlowPauseTimeout
    from prefect.flow_runs import pause_flow_run

    seconds = (until - datetime.now(UTC)).total_seconds()
    if seconds < 1:
        return None
    form = ApprovalForm.with_initial_data(
        description=f"**{markdown.text(name)} v{version}** waits for approval: approve or reject it, and say why."
        + (f"\n\n{markdown.text(note)}" if note else ""),
        decision="approve",
    )
    try:
        return pause_flow_run(wait_for_input=form, timeout=max(1, round(seconds)), poll_interval=POLL_SECONDS)
    except FlowPauseTimeout:
        _running_again()
        return None


def _running_again() -> None:
    """After an unanswered pause the run is still Paused on the server, which would end it as Failed
    ("never resumed"); waiting in vain is an outcome, so put it back to Running to finish normally."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run
    from prefect.states import Running

    with get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run.id, Running(message="no decision in time"), force=True)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("model", help=f"Registered model name ({MODEL_NAME_HELP}).")
    p.add_argument("version", help="Version number.")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--approve", action="store_true", help="Approve the version (and make it champion).")
    what.add_argument("--reject", action="store_true", help="Reject the version.")
    what.add_argument(
        "--wait", action="store_true", help="Wait for a decision in Prefect's UI (a paused flow run)."
    )
    p.add_argument("--reason", default="", help="Why (required with --approve and --reject).")
    p.add_argument("--no-promote", action="store_true", help="Approve without moving the champion alias.")
    p.add_argument("--force", action="store_true", help="Allow approving a Rejected version.")
    p.add_argument(
        "--timeout-minutes",
        type=float,
        default=DEFAULT_TIMEOUT_MINUTES,
        help="With --wait: how long the form waits (default: %(default)g).",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from tasks.steps.cli import configure_logging

    configure_logging()
    try:
        if args.wait:
            return _wait(args)
        record = decide_version(
            _client(),
            args.model,
            args.version,
            "approve" if args.approve else "reject",
            args.reason,
            promote=not args.no_promote,
            force=args.force,
        )
    except ApprovalRefused as exc:
        print(f"refused, nothing changed: {exc}", file=sys.stderr)
        return 2
    print(record.line())
    print(
        f"event: {record.event_id}"
        if record.event_id
        else "event: none sent (PREFECT_API_URL is not set: no Prefect server to tell)"
    )
    return 0


def _wait(args: argparse.Namespace) -> int:
    if not os.environ.get("PREFECT_API_URL"):
        print(
            "refused: --wait needs a Prefect server whose UI shows the form (PREFECT_API_URL is not set; "
            "start one with `python -m infra.stack up`)",
            file=sys.stderr,
        )
        return 2
    try:
        params = AwaitApprovalParams(
            model_name=args.model, version=args.version, timeout_minutes=args.timeout_minutes
        )
        find_version(_client(), params.model_name, params.version)
    except ValueError as exc:  # ApprovalRefused too: an unknown model or version
        print(f"refused: {exc}", file=sys.stderr)
        return 2
    result = await_approval(params)
    print(
        result.record.line()
        if result.record
        else f"{args.model} v{args.version}: {result.outcome} ({result.status})"
    )
    return 0


if __name__ == "__main__":
    exit_process(main())
