"""The drift story on the real data and the real stack, end to end, in one command.

    python -m deployments.drift_demo            (or: make drift-demo)

1. Starts the local stack (`infra.stack up`) in `.keel/drift-demo` on free ports: Prefect and MLflow
   servers, a Dask scheduler with two workers, and the deployments server.
2. Lands January-March 2011 in the landing folder and runs the `training-pipeline/scheduled`
   deployment on it: the first champion.
3. Lands the following weeks one file at a time. After every `--check-every` weeks, the drift
   monitor checks the newest file (the last week) against the champion's calibrated baseline, and
   the policy (`--policy`, the monitor's default unless given) decides; the decision is emitted as a
   Prefect event. A retrain decision starts `retrain/on-drift` through the automation; the demo
   waits for that flow run and reads what it did from the registry (promoted, rejected, or ignored
   in the cooldown).
4. Prints the timeline (and writes it to `timeline.md`) with links to every drift report, and leaves
   the stack running so the UIs can be browsed: `python -m infra.stack down --home .keel/drift-demo`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, cast

from pydantic import BaseModel

from infra.processes import free_port
from infra.stack import Stack, prefect_api
from tasks.monitoring.policies import DEFAULT_POLICY, parse_policy
from tasks.steps import markdown
from tasks.steps.tags import APPROVAL_TAG, CHAMPION_ALIAS, COMPARED_WITH_TAG, METRIC_TAG_PREFIX
from tasks.tabular.project import DEMO_TABLE

DATA = Path(__file__).resolve().parent.parent / "data" / "bike_sharing_hourly.csv"
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


class Step(BaseModel):
    week: str
    rows: int
    drift_share: float
    weighted_share: float
    retrain: bool
    reasons: list[str]
    report: str
    event_id: str | None
    outcome: str = ""


def start_stack(home: Path, serve_args: list[str]) -> dict[str, str]:
    python = sys.executable
    if (home / "stack.json").exists():
        subprocess.run([python, "-m", "infra.stack", "down", "--home", str(home)], check=True)
    for name in ("landing", "mlflow", "prefect", "state", "postgres"):
        _remove(home / name)
    ports = [
        arg
        for name in ("prefect", "mlflow", "dask", "dask-dashboard")
        for arg in (f"--{name}-port", str(free_port()))
    ]
    subprocess.run(
        [python, "-m", "infra.stack", "up", "--home", str(home), *ports, "--", *serve_args], check=True
    )
    return Stack(home).recorded_env()


def _remove(path: Path) -> None:
    import shutil

    if path.exists():
        shutil.rmtree(path)


if TYPE_CHECKING:
    import pandas as pd
    from mlflow import MlflowClient
    from prefect.client.schemas.objects import FlowRun


def run_deployment_and_wait(name: str, parameters: dict, timeout: float = 900) -> str:
    from prefect.deployments import run_deployment

    run = cast("FlowRun", run_deployment(name, parameters=parameters, timeout=timeout))  # called in sync code
    if run.state is None or run.state.type.value != "COMPLETED":
        raise RuntimeError(f"{name} ended {run.state}: see the Prefect UI")
    return run.name


def wait_for_retrain(env: dict[str, str], event_id: str, timeout: float = 900) -> dict:
    """The retrain flow run that the automation created for `event_id`, once it has finished."""
    import httpx

    deadline = time.monotonic() + timeout
    with prefect_api(env) as http:
        deployment = http.get("/deployments/name/retrain/on-drift").json()["id"]
        newest = {
            "deployments": {"id": {"any_": [deployment]}},
            "sort": "EXPECTED_START_TIME_DESC",
            "limit": 20,
        }
        while time.monotonic() < deadline:
            time.sleep(1)
            try:
                runs = http.post("/flow_runs/filter", json=newest).json()
            except httpx.TransportError:  # a busy server (SQLite, 2 cores): ask again
                continue
            mine = [r for r in runs if r["parameters"]["params"].get("event_id") == event_id]
            if mine and mine[0]["state"]["type"] in TERMINAL:
                run = mine[0]
                ignored = http.post(
                    "/artifacts/filter",
                    json={
                        "artifacts": {
                            "key": {"any_": ["retrain-ignored"]},
                            "flow_run_id": {"any_": [run["id"]]},
                        }
                    },
                ).json()
                run["ignored"] = ignored[0]["description"] if ignored else None
                return run
    raise TimeoutError(f"no finished retrain for event {event_id} after {timeout:g}s")


def describe_retrain(run: dict, client, model: str, event_id: str) -> str:
    if run["ignored"]:
        why = "cooldown" if "cooldown" in run["ignored"] else "a retrain is running"
        return f"ignored ({why})"
    if run["state"]["type"] != "COMPLETED":
        return f"retrain '{run['name']}' {run['state']['type']}: {run['state'].get('message')}"
    versions = [
        v
        for v in client.search_model_versions(f"name='{model}'")
        if v.tags.get("keel.trigger.event_id") == event_id
    ]
    if not versions:
        return f"retrain '{run['name']}' registered nothing"
    tags = versions[0].tags
    status = tags.get(APPROVAL_TAG)
    verdict = "-> @champion" if status == "Approved" else "(champion kept)"
    compared = (
        f"; test r2 {float(tags[METRIC_TAG_PREFIX + 'r2']):.3f}, judged against v{tags[COMPARED_WITH_TAG]} on the same data "
        "(its model card, the version's description, has both)"
        if COMPARED_WITH_TAG in tags and "metric.r2" in tags
        else ""
    )
    return f"retrain '{run['name']}': v{versions[0].version} {status} {verdict}{compared}"


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    home = args.home.resolve()
    serve_args = [
        "--model-name", args.model_name, "--cooldown-minutes", str(args.cooldown_minutes),
        "--window-days", str(args.window_days), "--n-trials", str(args.n_trials), "--policy", args.policy,
        "--target", "cnt", "--time-column", "dteday", "--key-columns", "dteday", "hr",
        "--drop-columns", "instant", "casual", "registered",
    ]  # fmt: skip
    print(f"== starting the stack in {home}", flush=True)
    env = start_stack(home, serve_args)
    os.environ.update(env)  # before Prefect and MLflow read their settings
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")

    import mlflow
    import pandas as pd

    from tasks.steps.cli import configure_logging

    configure_logging()
    landing = home / "landing"
    landing.mkdir(parents=True, exist_ok=True)
    bike = pd.read_csv(DATA)
    first = pd.Timestamp(args.first_week)
    bike[pd.to_datetime(bike["dteday"]) < first].to_parquet(
        landing / f"{bike.dteday.iloc[0]}.parquet", index=False
    )

    print(
        f"\n== training the first champion on {bike.dteday.iloc[0]} .. {(first - pd.Timedelta(days=1)).date()}"
    )
    name = run_deployment_and_wait(
        "training-pipeline/scheduled",
        {
            "params": {
                "data": str(landing),
                **{k: v for k, v in DEMO_TABLE.items() if k != "model_name"},  # a copy of the demo's table
                "model_name": args.model_name,
                "tuning": {"n_trials": args.n_trials},
                "reason": "drift demo: first champion",
            }
        },
    )
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"], registry_uri=env["MLFLOW_TRACKING_URI"])
    champion = client.get_model_version_by_alias(args.model_name, CHAMPION_ALIAS)
    print(
        f"   flow run '{name}': {args.model_name} v{champion.version} is champion (test r2 {champion.tags[METRIC_TAG_PREFIX + 'r2']})"
    )

    started = time.monotonic()
    timeline = _land_and_check_weekly(bike, landing, args, env, client)
    table = render(timeline, args.model_name, client)
    (home / "timeline.md").write_text(table + "\n")
    print(
        f"\n== timeline ({time.monotonic() - started:.0f} s for {len(timeline)} weeks), also in {home / 'timeline.md'}\n"
    )
    print(table)
    print(
        f"\nPrefect UI: {env['PREFECT_API_URL'].removesuffix('/api')} (log in with keel:$(cat {home}/secrets/prefect-auth-token))\n"
        f"MLflow UI:  {env['MLFLOW_TRACKING_URI']} (user viewer, password in {home}/secrets/mlflow-viewer-password)\n"
        f"Stop the stack: python -m infra.stack down --home {home}"
    )
    return 0


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m deployments.drift_demo", description=__doc__)
    parser.add_argument("--home", type=Path, default=Path(".keel/drift-demo"))
    parser.add_argument("--model-name", default="bike-demand")
    parser.add_argument("--first-week", type=date.fromisoformat, default=date(2011, 4, 1))
    parser.add_argument("--weeks", type=int, default=44, help="Weekly batches to land (default: into 2012).")
    parser.add_argument("--check-every", type=int, default=2, help="Run the monitor after every N-th week.")
    parser.add_argument("--cooldown-minutes", type=float, default=1.0, help="Retrain cooldown (wall-clock).")
    parser.add_argument("--window-days", type=int, default=90, help="Retrain on the last N days landed.")
    parser.add_argument("--n-trials", type=int, default=8, help="Tuning trials of each training.")
    parser.add_argument(
        "--policy", default=DEFAULT_POLICY, help="Retrain policy of the monitor (see flows.monitor)."
    )
    args = parser.parse_args(argv)
    try:
        args.policy = parse_policy(args.policy).text
    except ValueError as exc:
        parser.error(str(exc))
    return args


def _land_and_check_weekly(
    bike: pd.DataFrame, landing: Path, args: argparse.Namespace, env: dict[str, str], client: MlflowClient
) -> list[Step]:
    """Land a week at a time; every `check_every` weeks, monitor the latest one, and follow the
    retrain its event starts (through the stack's automation) to its decision."""
    import pandas as pd

    from flows.monitor import MonitorParams, monitor

    days = pd.to_datetime(bike["dteday"])
    first = pd.Timestamp(args.first_week)
    timeline: list[Step] = []
    for index in range(args.weeks):
        start = first + pd.Timedelta(days=7 * index)
        week = bike[(days >= start) & (days < start + pd.Timedelta(days=7))]
        if week.empty:
            break
        week.to_parquet(landing / f"{start.date()}.parquet", index=False)
        if (index + 1) % args.check_every:
            continue
        result = monitor(
            MonitorParams(batch=str(landing), latest=True, model_name=args.model_name, policy=args.policy)
        )
        check = result.check
        step = Step(
            week=str(start.date()),
            rows=check.rows,
            drift_share=check.verdict.evidently_share,
            weighted_share=check.verdict.weighted_share,
            retrain=check.retrain,
            reasons=check.decision.reasons,
            report=result.report.link,
            event_id=result.event_id,
        )
        if check.retrain and result.event_id:
            run = wait_for_retrain(env, result.event_id)
            step.outcome = describe_retrain(run, client, args.model_name, result.event_id)
        timeline.append(step)
        print(_line(step), flush=True)
    return timeline


def _line(step: Step) -> str:
    verdict = "RETRAIN   " if step.retrain else "no retrain"
    event = f"event {step.event_id[:8]}…" if step.event_id else "no event"
    why = f"  ({step.reasons[0].split(':')[0]})" if step.reasons else ""
    return (
        f"   week of {step.week}: {step.rows:4d} rows  Evidently's share {step.drift_share:.2f}  "
        f"weighted calibrated {step.weighted_share:.2f}  {verdict}{why}  {event}  {step.outcome}"
    )


def render(timeline: list[Step], model: str, client) -> str:
    lines = [
        "| week of | rows | Evidently's share | weighted calibrated share | decision | why | event | retrain | report |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in timeline:
        lines.append(
            f"| {s.week} | {s.rows} | {s.drift_share:.2f} | {s.weighted_share:.2f} | "
            f"{'**retrain**' if s.retrain else 'no retrain'} | {markdown.text('; '.join(s.reasons))} | "
            f"{(s.event_id or '')[:8]} | {markdown.text(s.outcome)} | {markdown.link('report', s.report)} |"
        )
    versions = sorted(client.search_model_versions(f"name='{model}'"), key=lambda v: int(v.version))
    champion = client.get_model_version_by_alias(model, CHAMPION_ALIAS).version
    lines += ["", "| version | status | trigger | test r2 | champion |", "|---|---|---|---|---|"]
    for v in versions:
        trigger = (v.tags.get("keel.trigger.event_id") or "")[:8] or v.tags.get("reason", "")
        lines.append(
            f"| v{v.version} | {v.tags.get(APPROVAL_TAG)} | {trigger} | {v.tags.get(METRIC_TAG_PREFIX + 'r2')} | "
            f"{'**@champion**' if str(v.version) == str(champion) else ''} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
