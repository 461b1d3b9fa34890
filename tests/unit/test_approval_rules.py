"""The rules of an approval decision that need no registry: transitions, reasons, the card's record."""

from __future__ import annotations

import pytest

from tasks.steps.approval import (
    ApprovalRecord,
    ApprovalRefused,
    check_transition,
    checked_reason,
    with_decision,
)


@pytest.mark.parametrize(
    ("decision", "status", "champion", "force", "refused"),
    [
        ("approve", "PendingManualApproval", None, False, None),
        ("approve", "Approved", "3", False, None),
        ("approve", "Rejected", None, False, "needs --force"),
        ("approve", "Rejected", None, True, None),
        ("approve", "none", None, False, None),  # registered outside keel: no status yet
        ("reject", "PendingManualApproval", "1", False, None),
        ("reject", "Approved", "1", False, None),  # approved earlier, not serving
        ("reject", "Approved", "3", False, "is the champion"),
        ("reject", "Approved", "3", True, "is the champion"),  # no force rejects the champion
    ],
)
def test_transitions(decision, status, champion, force, refused):
    if refused is None:
        check_transition(decision, status, "3", champion, "m", force)
    else:
        with pytest.raises(ApprovalRefused, match=refused):
            check_transition(decision, status, "3", champion, "m", force)


def test_a_reason_is_one_line_of_at_most_500_characters():
    assert checked_reason("  two\nlines\t here ") == "two lines here"
    for blank in ("", "   ", "\n\t"):
        with pytest.raises(ApprovalRefused, match="--reason is required"):
            checked_reason(blank)
    with pytest.raises(ApprovalRefused, match="501 characters"):
        checked_reason("x" * 501)


def test_the_card_records_each_decision_escaped():
    record = ApprovalRecord(
        model_name="m",
        version="3",
        decision="approve",
        status="Approved",
        previous_status="PendingManualApproval",
        decided_by="<script>alert(1)</script>",
        decided_at="2026-12-01T10:00:00+00:00",
        reason="ok | [click](javascript:alert(1))",
        previous_champion="2",
        champion="3",
    )
    card = with_decision("# m v3\n\nA card.", record)
    assert card.startswith("# m v3\n\nA card.\n\n## Approval decisions\n- ")
    assert "<script>" not in card and "&lt;script&gt;" in card
    assert "[click](" not in card and "\\[click\\]" in card and "\\|" in card
    assert "champion: v2 -> v3" in card
    twice = with_decision(card, record.model_copy(update={"status": "Rejected", "champion": "2"}))
    assert twice.count("## Approval decisions") == 1 and twice.count("\n- ") == 2
