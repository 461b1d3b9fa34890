"""The model card, the execution summary and MLflow parameters, on their own: what they say, what
they link to, and that values from data or users stay text."""

from __future__ import annotations

from tasks.steps import summary
from tasks.steps.lineage import flatten, mlflow_ui_link, run_link
from tasks.steps.refs import DatasetRef
from tasks.tabular import model_card

HOSTILE = '<img src=x onerror="alert(1)">|x'


def facts(**changes) -> model_card.CardFacts:
    raw = DatasetRef(
        name="raw",
        uri="/k/inputs/abc/sales.csv",
        digest="a" * 64,
        format="csv",
        source=f"/data/{HOSTILE}.csv",
    )
    base = dict(
        model_name="sales",
        version="3",
        status="Approved",
        champion=True,
        previous_champion="2",
        task="regression",
        target=HOSTILE,
        inputs=["day", HOSTILE],
        metrics={"r2": 0.91234, "rmse": 12.5},
        compared=("2", {"r2": 0.9, "rmse": 13.0}),
        gate_message="quality-gate passed: test_r2 = 0.9123 >= min_r2 = 0.6: passed",
        datasets={"raw": raw},
        boundaries={
            "start": "2024-01-01T00:00",
            "valid_start": "2024-03-01",
            "test_start": "2024-04-01",
            "end": "2024-04-30",
        },
        reason=f"drift {HOSTILE}",
        trigger={"event_id": "e-1", "drift_report": "http://127.0.0.1:5000/#/x"},
        execution_run_id="run123",
        execution_link="http://127.0.0.1:5000/#/experiments/1/runs/run123?workflowType=machine_learning",
    )
    return model_card.CardFacts(**{**base, **changes})


def test_the_card_says_what_the_model_is_how_it_did_and_where_its_data_is():
    card = model_card.render(facts())
    assert card.startswith("# sales v3: Approved, champion")
    assert "| r2 | 0.9123 | 0.9 |" in card  # this version beside the champion it was judged against
    assert "this version (was v2)" in card
    assert "| raw |  | 2024-01-01 .. 2024-04-30 | aaaaaaaaaaaaaaaa… |" in card
    assert (
        "[execution run123](http://127.0.0.1:5000/#/experiments/1/runs/run123?workflowType=machine_learning)"
        in card
    )
    assert "[http://127.0.0.1:5000/#/x](http://127.0.0.1:5000/#/x)" in card  # the trigger's report, a link


def test_values_from_data_and_users_stay_text_in_the_card():
    card = model_card.render(facts())
    assert "<img" not in card and "&lt;img src=x onerror=" in card
    assert "\\|x" in card  # a pipe does not break a table


def test_the_monitoring_section_is_replaced_not_appended():
    card = model_card.render(facts())
    once = model_card.with_monitoring(card, "first check")
    twice = model_card.with_monitoring(once, "second check")
    assert "second check" in twice and "first check" not in twice and twice.count("## Monitoring") == 1
    assert "Not monitored yet" in card and "Not monitored yet" not in once
    assert "## Monitoring" in model_card.with_monitoring("written by hand", "a check")


def test_a_rejected_challenger_says_the_champion_stayed():
    card = model_card.render(facts(status="Rejected", champion=False, previous_champion="2"))
    assert card.startswith("# sales v3: Rejected\n") and "unchanged (v2)" in card


def test_the_summary_is_a_table_of_escaped_values_and_safe_links():
    text = summary.render(
        "training-pipeline: completed",
        [
            summary.Fact("Model version", "sales v3", "http://127.0.0.1:5000/#/models/sales/versions/3"),
            summary.Fact("Input", HOSTILE),
            summary.Fact("Report", "x", "javascript:alert(1)"),
        ],
    )
    assert "| Model version | [sales v3](http://127.0.0.1:5000/#/models/sales/versions/3) |" in text
    assert "<img" not in text and "](javascript:" not in text


def test_mlflow_links_open_the_model_training_layout_and_only_with_a_server():
    assert (
        run_link("http://h:5000/", "1", "r")
        == "http://h:5000/#/experiments/1/runs/r?workflowType=machine_learning"
    )
    assert mlflow_ui_link("sqlite:///x.db", "experiments/1") is None


def test_lists_of_records_are_not_parameters():
    flat = flatten(
        {"tuning": {"best_trial": 3, "trials": [{"number": 1}, {"number": 2}]}, "columns": ["a", "b"]}
    )
    assert flat == {"tuning.best_trial": "3", "columns": '["a", "b"]'}
