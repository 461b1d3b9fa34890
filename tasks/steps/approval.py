"""A person's decision on a registered model version (SageMaker's model package approval status).

`decide_version` is the one place a decision is applied, whether it comes from the command line
(`python -m flows.approve`) or from the form of a paused flow run in Prefect's UI: it checks the
transition, sets `approval_status` and who, when and why on the version, appends the decision to the
version's model card, moves `champion` to an approved version, and emits `keel.model.approved` or
`keel.model.rejected` about it (EventBridge's "Model Package State Change").

Everything is checked before anything is written: a refused decision changes nothing.
"""

from __future__ import annotations

import getpass
import re
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, Field

from tasks.steps import markdown
from tasks.steps.events import emit_about_version
from tasks.steps.model import ApprovalStatus, checked_model_name, find_champion
from tasks.steps.tags import (
    APPROVAL_AT_TAG,
    APPROVAL_EVENT_TAG,
    APPROVAL_PREVIOUS_CHAMPION_TAG,
    APPROVAL_PREVIOUS_STATUS_TAG,
    APPROVAL_REASON_TAG,
    APPROVAL_TAG,
    APPROVED_BY_TAG,
    CHAMPION_ALIAS,
    MODEL_APPROVED_EVENT,
    MODEL_REJECTED_EVENT,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

Decision = Literal["approve", "reject"]
MAX_REASON = 500  # characters: a reason is a sentence, and it goes into tags, the card and the event
HISTORY_HEADING = "## Approval decisions"


class ApprovalRefused(ValueError):
    """A decision that cannot be applied (unknown model or version, an illegal transition, no reason):
    nothing was changed."""


class ApprovalRecord(BaseModel):
    """What a decision did, as recorded on the version and sent with the event."""

    model_name: str
    version: str
    decision: Decision
    status: ApprovalStatus = Field(description="The version's approval status after the decision.")
    previous_status: str
    decided_by: str
    decided_at: str
    reason: str
    previous_champion: str | None = Field(description="The champion before the decision.")
    champion: str | None = Field(description="The champion after it.")
    event_id: str | None = None

    def line(self) -> str:
        moved = (
            f"champion v{self.previous_champion or '-'} -> v{self.champion}"
            if self.champion != self.previous_champion
            else f"champion stays v{self.champion or '-'}"
        )
        return (
            f"{self.model_name} v{self.version}: {self.previous_status} -> {self.status} by {self.decided_by} "
            f"({self.reason}); {moved}"
        )


def os_user() -> str:
    """Who runs this process, for the record."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        return "unknown user"


def checked_reason(reason: str) -> str:
    """A reason is required: one line, printable, at most MAX_REASON characters."""
    cleaned = re.sub(r"\s+", " ", str(reason)).strip()
    if not cleaned:
        raise ApprovalRefused("--reason is required: say why, it is recorded on the version and in the event")
    if len(cleaned) > MAX_REASON:
        raise ApprovalRefused(f"--reason is {len(cleaned)} characters long; at most {MAX_REASON}")
    return cleaned


def find_version(client: MlflowClient, name: str, version: str) -> ModelVersion:
    """The version, or ApprovalRefused naming what is unknown."""
    from mlflow.exceptions import MlflowException

    try:
        checked_model_name(name)
    except ValueError as exc:
        raise ApprovalRefused(str(exc)) from exc
    if not re.fullmatch(r"[1-9][0-9]{0,9}", str(version)):
        raise ApprovalRefused(f"version {str(version)[:40]!r} is not a version number (1, 2, ...)")
    try:
        return client.get_model_version(name, str(version))
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE"):
            raise
    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"):
            raise ApprovalRefused(f"there is no registered model {name!r}") from exc
        raise
    raise ApprovalRefused(f"model {name!r} has no version {version}")


def check_transition(
    decision: Decision, status: str, version: str, champion: str | None, name: str, force: bool
) -> None:
    """The transitions a decision may make (ApprovalRefused otherwise)."""
    if decision == "approve" and status == "Rejected" and not force:
        raise ApprovalRefused(
            f"{name} v{version} was Rejected; approving a rejected version needs --force "
            "(see its approval.reason tag for why it was rejected)"
        )
    if decision == "reject" and champion == version:
        raise ApprovalRefused(
            f"{name} v{version} is the champion: a rejected champion would keep serving. Approve another "
            f"version first (python -m flows.approve {name} N --approve --reason ...), then reject this one"
        )


def decide_version(
    client: MlflowClient,
    name: str,
    version: str,
    decision: Decision,
    reason: str,
    decided_by: str | None = None,
    promote: bool = True,
    force: bool = False,
) -> ApprovalRecord:
    """Apply a decision to a version: status, record, card, `champion` (approve, unless not
    `promote`), event. ApprovalRefused, before any change, when it cannot be applied."""
    reason = checked_reason(reason)
    current = find_version(client, name, version)
    version = str(current.version)
    status = current.tags.get(APPROVAL_TAG, "none")
    champion = find_champion(client, name)
    previous_champion = str(champion.version) if champion is not None else None
    check_transition(decision, status, version, previous_champion, name, force)

    new_status: ApprovalStatus = "Approved" if decision == "approve" else "Rejected"
    record = ApprovalRecord(
        model_name=name,
        version=version,
        decision=decision,
        status=new_status,
        previous_status=status,
        decided_by=decided_by or os_user(),
        decided_at=datetime.now(UTC).isoformat(timespec="seconds"),
        reason=reason,
        previous_champion=previous_champion,
        champion=version if decision == "approve" and promote else previous_champion,
    )
    for key, value in {
        APPROVAL_TAG: new_status,
        APPROVED_BY_TAG: record.decided_by,
        APPROVAL_AT_TAG: record.decided_at,
        APPROVAL_REASON_TAG: reason,
        APPROVAL_PREVIOUS_STATUS_TAG: status,
        APPROVAL_PREVIOUS_CHAMPION_TAG: previous_champion or "none",
    }.items():
        client.set_model_version_tag(name, version, key, value)
    client.update_model_version(name, version, description=with_decision(current.description or "", record))
    if record.champion != previous_champion:
        client.set_registered_model_alias(name, CHAMPION_ALIAS, version)
    record.event_id = emit_about_version(
        MODEL_APPROVED_EVENT if decision == "approve" else MODEL_REJECTED_EVENT,
        name,
        version,
        record.model_dump(mode="json", exclude={"event_id"}),
    )
    if record.event_id:
        client.set_model_version_tag(name, version, APPROVAL_EVENT_TAG, record.event_id)
    return record


def with_decision(card: str, record: ApprovalRecord) -> str:
    """The model card with the decision appended under its own heading (escaped: the reason and the
    name are a person's text)."""
    line = (
        f"- {markdown.text(record.decided_at)}: **{record.status}** by {markdown.text(record.decided_by)} "
        f"(was {markdown.text(record.previous_status)}): {markdown.text(record.reason)}"
    )
    if record.champion != record.previous_champion:
        line += f". {CHAMPION_ALIAS}: v{record.previous_champion or '-'} -> v{record.champion}"
    if HISTORY_HEADING not in card:
        card = card.rstrip() + f"\n\n{HISTORY_HEADING}\n"
    return card.rstrip() + "\n" + line + "\n"
