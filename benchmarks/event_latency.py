"""B5: latency from a drift event to the retrain flow running, on the local stack (`infra.stack up`).

    .venv/bin/python -m benchmarks.event_latency --events 10

Starts the stack in a temporary folder on free ports, emits `keel.drift.detected` events one at a
time (each about another model, so no lock or cooldown is involved), and reads from the Prefect API
when the automation created the retrain flow run and when that run entered Running. The flow runs
then stop early (the models do not exist): only the time to start is measured. Stops the stack.
Writes benchmarks/results/event_latency.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import datetime

from benchmarks.common import heading, local_stack, machine, spread, summary, target_row, write_results

TARGET_S = 10.0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=10)
    parser.add_argument("--gap", type=float, default=12.0, help="Seconds between events.")
    args = parser.parse_args()
    with local_stack() as (env, up_seconds):
        samples = measure(env, args.events, args.gap)
    write(samples, up_seconds, args.events, args.gap)


def measure(env: dict[str, str], events: int, gap: float) -> list[dict]:
    from prefect.events import emit_event

    from infra.stack import prefect_api

    samples = []
    with prefect_api(env) as http:
        deployment = http.get("/deployments/name/retrain/on-drift").json()["id"]
        for index in range(events):
            model = f"latency-{index}-{int(time.time())}"
            event = emit_event(
                event="keel.drift.detected",
                resource={
                    "prefect.resource.id": f"keel.model.{model}.v1",
                    "keel.model.name": model,
                    "keel.model.version": "1",
                },
                payload={"drift_share": 1.0, "report_uri": "file:///benchmark"},
            )
            emitted = event.occurred.timestamp()
            deadline = time.monotonic() + 120
            run = None
            while time.monotonic() < deadline:
                runs = http.post(
                    "/flow_runs/filter", json={"deployments": {"id": {"any_": [deployment]}}, "limit": 200}
                ).json()
                found = [r for r in runs if r["parameters"]["params"]["model_name"] == model]
                if found and found[0]["start_time"]:
                    run = found[0]
                    break
                time.sleep(0.2)
            if run is None:
                raise TimeoutError(f"no retrain run started for event {event.id}")
            sample = {
                "created_s": _ts(run["created"]) - emitted,
                "running_s": _ts(run["start_time"]) - emitted,
            }
            samples.append(sample)
            print(json.dumps(sample), flush=True)
            time.sleep(gap)
    return samples


def _ts(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def write(samples: list[dict], up_seconds: float, events: int, gap: float) -> None:
    created = summary([s["created_s"] for s in samples])
    running = summary([s["running_s"] for s in samples])
    result = {
        "command": f"python -m benchmarks.event_latency --events {events} --gap {gap:g}",
        "machine": machine(),
        "stack_up_s": up_seconds,
        "runner_poll_seconds": 1,
        "created_s": created,
        "running_s": running,
        "samples": samples,
        "summary": [
            target_row(
                "B5",
                "drift event -> retrain flow running, local stack",
                spread(running, digits=2),
                f"(flow run created: {spread(created, digits=2)})",
                f"{running['median']:.2f} s median",
                f"<= {TARGET_S:.0f} s",
                running["median"] <= TARGET_S,
            )
        ],
    }
    lines = [
        *heading("B5: drift event -> retrain flow running (local stack)", result),
        "| from the event to | median | min | max | events |",
        "|---|---|---|---|---|",
        *(
            f"| {label} | {x['median']:.2f} s | {x['min']:.2f} s | {x['max']:.2f} s | {x['runs']} |"
            for label, x in (("flow run created by the automation", created), ("flow run Running", running))
        ),
        "",
        f"Stack start-up (`infra.stack up`, all health checks): {up_seconds:.1f} s. Runner poll: 1 s.",
    ]
    write_results("event_latency", result, "\n".join(lines))


if __name__ == "__main__":
    main()
