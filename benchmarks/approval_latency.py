"""B15: an approval decided -> the champion moved and `keel.model.approved` seen, on the local stack.

    .venv/bin/python -m benchmarks.approval_latency --decisions 5

Starts the stack (`infra.stack up`) in a temporary folder on free ports and registers versions as
PendingManualApproval (each a new model, so every decision moves a champion). Two paths, each
`--decisions` times:
- the command line's decision (`tasks.steps.approval.decide_version`, what `python -m flows.approve`
  calls), timed from the call;
- the form of the paused `await-approval` flow run, answered through Prefect's API as its UI sends
  it (POST /flow_runs/{id}/resume with the form's values), timed from that request.
Each ends when another client reads the `champion` alias on the version and the Prefect API returns
the event. For context, the wall time of `python -m flows.approve ... --approve` as a new process
(mostly imports). Stops the stack. Writes benchmarks/results/approval_latency.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from benchmarks.common import ROOT, heading, local_stack, machine, spread, summary, target_row, write_results

TARGET_S = 2.0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--decisions", type=int, default=5)
    args = parser.parse_args()
    with local_stack() as (env, _):
        cli = [decide_on_the_command_line(env, i) for i in range(args.decisions)]
        form = [decide_in_the_form(env, i) for i in range(args.decisions)]
        process = [approve_as_a_process(env, i) for i in range(args.decisions)]
    write(cli, form, process, args.decisions)


def pending(name: str) -> str:
    """A new model with one version waiting for approval; its version."""
    from tasks.steps.lineage import mlflow_client
    from tasks.steps.settings import get_settings

    client = mlflow_client(get_settings())
    experiment = client.get_experiment_by_name("approval-latency")
    experiment_id = experiment.experiment_id if experiment else client.create_experiment("approval-latency")
    run = client.create_run(experiment_id)
    client.log_text(run.info.run_id, "a model", "model/MLmodel")
    client.create_registered_model(name)
    version = client.create_model_version(
        name,
        source=f"{run.info.artifact_uri}/model",
        run_id=run.info.run_id,
        tags={"approval_status": "PendingManualApproval"},
    )
    return str(version.version)


def seen(env: dict[str, str], name: str, version: str, started: float, timeout: float = 60) -> float:
    """Seconds from `started` until the alias points at the version and the event is in the API."""
    import mlflow

    from infra.stack import prefect_api

    other = mlflow.MlflowClient(
        tracking_uri=env["MLFLOW_TRACKING_URI"], registry_uri=env["MLFLOW_TRACKING_URI"]
    )
    moved = event = False
    with prefect_api(env) as http:
        while time.perf_counter() - started < timeout:
            if not moved:
                try:
                    moved = str(other.get_model_version_by_alias(name, "champion").version) == version
                except Exception:  # no alias yet
                    moved = False
            if not event:
                found = http.post(
                    "/events/filter",
                    json={
                        "filter": {
                            "event": {"name": ["keel.model.approved"]},
                            "resource": {"id": [f"keel.model.{name}.v{version}"]},
                        }
                    },
                ).json()["events"]
                event = bool(found)
            if moved and event:
                return time.perf_counter() - started
            time.sleep(0.05)
    raise TimeoutError(f"{name} v{version}: champion moved {moved}, event seen {event}")


def decide_on_the_command_line(env: dict[str, str], index: int) -> float:
    from tasks.steps.approval import decide_version
    from tasks.steps.lineage import mlflow_client
    from tasks.steps.settings import get_settings

    name = f"b15-cli-{index}-{int(time.time())}"
    version = pending(name)
    client = mlflow_client(get_settings())
    started = time.perf_counter()
    decide_version(client, name, version, "approve", "benchmark")
    took = seen(env, name, version, started)
    print(f"command line {index + 1}: {took:.2f} s", flush=True)
    return took


def decide_in_the_form(env: dict[str, str], index: int) -> float:
    from infra.stack import prefect_api

    name = f"b15-form-{index}-{int(time.time())}"
    version = pending(name)
    waiting = subprocess.Popen(
        [sys.executable, "-m", "flows.approve", name, version, "--wait", "--timeout-minutes", "10"],
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        with prefect_api(env) as http:
            deadline = time.monotonic() + 180
            while True:
                runs = http.post(
                    "/flow_runs/filter",
                    json={"flow_runs": {"state": {"type": {"any_": ["PAUSED"]}}}, "limit": 50},
                ).json()
                mine = [r for r in runs if r["parameters"].get("params", {}).get("model_name") == name]
                if mine and mine[0]["state"]["state_details"].get("run_input_keyset"):
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{name}: no paused await-approval run")
                time.sleep(0.2)
            answer = {"decision": "approve", "reason": "benchmark", "decided_by": "bench", "promote": True}
            started = time.perf_counter()
            http.post(f"/flow_runs/{mine[0]['id']}/resume", json={"run_input": answer}).raise_for_status()
            took = seen(env, name, version, started)
        waiting.wait(timeout=120)
    finally:
        waiting.kill()
    print(f"form {index + 1}: {took:.2f} s", flush=True)
    return took


def approve_as_a_process(env: dict[str, str], index: int) -> float:
    name = f"b15-process-{index}-{int(time.time())}"
    version = pending(name)
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "flows.approve", name, version, "--approve", "--reason", "benchmark"],
        cwd=ROOT,
        env={**os.environ, **env},
        check=True,
        capture_output=True,
    )
    took = seen(env, name, version, started)
    print(f"new process {index + 1}: {took:.2f} s", flush=True)
    return took


def write(cli: list[float], form: list[float], process: list[float], decisions: int) -> None:
    c, f, p = summary(cli), summary(form), summary(process)
    result = {
        "command": f"python -m benchmarks.approval_latency --decisions {decisions}",
        "machine": machine(),
        "command_line_s": c,
        "form_s": f,
        "new_process_s": p,
        "summary": [
            target_row(
                "B15",
                "approval decided -> champion moved and event seen, local stack: the command line's decision",
                spread(c, digits=2),
                f"(python -m flows.approve as a new process, imports included: {spread(p, digits=2)})",
                f"{c['median']:.2f} s median",
                f"<= {TARGET_S:.0f} s",
                c["median"] <= TARGET_S,
            ),
            target_row(
                "B15",
                "the same, the form of the paused flow run answered as Prefect's UI sends it",
                spread(f, digits=2),
                "",
                f"{f['median']:.2f} s median",
                f"<= {TARGET_S:.0f} s",
                f["median"] <= TARGET_S,
            ),
        ],
    }
    lines = [
        *heading("B15: approval decided -> champion moved and event seen (local stack)", result),
        "| decided through | median | min | max | decisions |",
        "|---|---|---|---|---|",
        *(
            f"| {label} | {x['median']:.2f} s | {x['min']:.2f} s | {x['max']:.2f} s | {x['runs']} |"
            for label, x in (
                ("the command line's decision (decide_version)", c),
                ("the form (POST /flow_runs/{id}/resume)", f),
                ("`python -m flows.approve` as a new process, from its start", p),
            )
        ),
    ]
    write_results("approval_latency", result, "\n".join(lines))


if __name__ == "__main__":
    main()
