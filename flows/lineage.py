"""Lineage queries (SageMaker's QueryLineage): what made a model version and what used it since, or
every run that read or wrote a dataset. Reads the MLflow store (`MLFLOW_TRACKING_URI`, or the
project's embedded one); starts no flow run.

    python -m flows.lineage --model bike-demand --version 3          # a readable tree
    python -m flows.lineage --model bike-demand --version 3 --json   # the same as JSON
    python -m flows.lineage --dataset data/bike_sharing_hourly.csv   # by content: its digest
    python -m flows.lineage --dataset 5f8407a7d363                   # or a digest (12+ hex digits)

A version: its training data (locations, digests), code (git commit, source, Prefect flow run),
the execution and its steps with what each read and wrote, the trigger (a retrain's event and drift
report), its approval record, the champion it was compared with or replaced, its scoring runs and
monitoring checks (drift, and late labels judged). A dataset: each run that read or wrote it, as
which input or output, and the versions those executions registered. Exit 2: no such model or version, a dataset that is neither
an existing path nor a digest.
"""

from __future__ import annotations

if __name__ == "__main__":  # with the warm pool, its runner runs this command: libraries already imported
    from infra.runner import hand_off

    hand_off(__spec__)

import argparse
import json
import re
import sys
from collections.abc import Sequence
from datetime import UTC, datetime

from pydantic import BaseModel

from tasks.steps.cli import exit_process
from tasks.steps.lineage_query import (
    DatasetLineage,
    DatasetNode,
    RunNode,
    VersionLineage,
    as_json,
    champion_mark,
    dataset_lineage,
    version_lineage,
)

PROG = "python -m flows.lineage"
CHECKS_SHOWN = 5  # monitoring checks listed in the tree (--json has them all)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", help="Registered model name (with --version).")
    what.add_argument("--dataset", help="A file or folder (its content digest is looked up), or a digest.")
    p.add_argument("--version", help="The model's version number.")
    p.add_argument("--json", action="store_true", help="Print JSON instead of a tree.")
    return p


def _when(ms: int | None) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M") if ms else "?"


def _dataset(d: DatasetNode) -> str:
    rows = f", {d.rows:,} rows" if d.rows is not None else ""
    return f"{d.name}: {d.location or '?'} (sha256 {d.digest[:12]}{rows})"


def _run(r: RunNode) -> str:
    what = r.step or r.pipeline or "run"
    kind = f" [{r.kind}]" if r.kind else ""
    cache = f", cache {r.cache}" if r.cache else ""
    return f"{what}{kind} {r.run_id} {r.status.lower()} {_when(r.started)}{cache}"


def version_tree(v: VersionLineage) -> str:
    lines = [f"{v.model_name} v{v.version}{champion_mark(v)} — {v.approval_status}"]
    if v.metrics:
        lines.append("├─ metrics: " + ", ".join(f"{k} {val}" for k, val in sorted(v.metrics.items())))
    lines.append("├─ training data")
    lines += _branches([_dataset(d) for d in v.training_data] or ["(none recorded)"], "│  ")
    lines.append("├─ code: " + (", ".join(f"{k} {val}" for k, val in v.code.items()) or "(none recorded)"))
    if v.execution:
        lines.append(f"├─ execution: {_run(v.execution)}")
        for step in v.steps:
            lines.append(f"│  ├─ {_run(step)}")
            lines += [f"│  │   reads {_dataset(d)}" for d in step.reads]
            lines += [f"│  │   wrote {_dataset(d)}" for d in step.writes]
    lines.append(
        "├─ trigger: "
        + (", ".join(f"{k} {val}" for k, val in v.trigger.items()) or "none (run by hand or on a schedule)")
    )
    lines.append(
        "├─ approval: " + (", ".join(f"{k} {val}" for k, val in v.approval.items()) or "no decision recorded")
    )
    lines.append(
        f"├─ replaced or compared with: {'v' + v.replaced if v.replaced and v.replaced != 'none' else 'no champion'}"
    )
    lines.append(f"├─ scoring runs: {len(v.scoring_runs)}")
    lines += _branches(
        [
            f"{_run(r)}: {', '.join(d.location or d.digest[:12] for d in r.reads) or '?'} -> "
            + (", ".join(d.location or d.digest[:12] for d in r.writes) or "?")
            for r in v.scoring_runs
        ],
        "│  ",
    )
    lines.append(
        f"└─ monitoring checks: {len(v.monitoring_checks)}"
        + (f" (the last {CHECKS_SHOWN})" if len(v.monitoring_checks) > CHECKS_SHOWN else "")
    )
    lines += _branches([_run(r) for r in v.monitoring_checks[-CHECKS_SHOWN:]], "   ")
    return "\n".join(lines)


def _branches(items: list[str], indent: str) -> list[str]:
    """Items as a tree's branches: ├─ each, └─ the last."""
    return [f"{indent}{'└─' if i == len(items) - 1 else '├─'} {item}" for i, item in enumerate(items)]


def dataset_tree(d: DatasetLineage) -> str:
    uses = [
        f"{u.role} as {u.as_name} by {_run(u.run)}"
        + (f" -> registered {', '.join(u.registered)}" if u.registered else "")
        for u in d.uses
    ]
    return "\n".join(
        [f"dataset sha256 {d.digest[:12]}… ({d.given}): {len(d.uses)} uses", *_branches(uses, "")]
    )


def digest_of(given: str) -> str:
    """A dataset's digest: a path's content digest (checked like any input location), or the text
    itself when it is a digest of 12 to 64 hex digits."""
    from tasks.steps.access import checked_files
    from tasks.steps.errors import DataValidationError
    from tasks.steps.refs import content_digest
    from tasks.steps.settings import get_settings

    if re.fullmatch(r"[0-9a-fA-F]{12,64}", given):
        return given.lower()
    location, files = checked_files(given, get_settings().data_access)
    if not files:
        raise DataValidationError(given, "neither an existing file or folder nor a digest (12-64 hex digits)")
    return content_digest(location)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.model and not args.version:
        parser().error("--model needs --version")
    from tasks.steps.errors import DataValidationError, NotInRegistry
    from tasks.steps.lineage import mlflow_client
    from tasks.steps.model import checked_model_name
    from tasks.steps.settings import get_settings

    try:
        client = mlflow_client(get_settings())
        if args.model:
            checked_model_name(args.model)
            if not re.fullmatch(r"[1-9][0-9]{0,9}", args.version):
                raise DataValidationError("--version", f"{args.version[:40]!r} is not a version number")
            found = version_lineage(client, args.model, args.version)
            result: BaseModel = found
            text = version_tree(found)
        else:
            uses = dataset_lineage(client, digest_of(args.dataset), args.dataset)
            result, text = uses, dataset_tree(uses)
    except (DataValidationError, NotInRegistry, ValueError) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(as_json(result), indent=1) if args.json else text)
    return 0


if __name__ == "__main__":
    exit_process(main())
