"""Retraining: the training pipeline on a new data window, judged against the current champion.

    python -m flows.retrain --help

The challenger is promoted only when it beats the champion on the same held-out test period by
`--champion-margin`; otherwise its version is registered as `Rejected`, with the reason, and the
champion stays. The run's reason (`--reason`, e.g. "drift detected") is recorded on the MLflow run
and the model version.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Literal

from prefect import flow
from pydantic import Field

from flows.cli import run_flow_cli
from flows.pipeline import PipelineParams, PipelineResult, training_pipeline, where_to_look


class RetrainParams(PipelineParams):
    """The pipeline's parameters, with retraining defaults: a losing challenger is kept as Rejected."""

    reason: str = Field(default="scheduled retrain", max_length=500, description="Why this retrain runs.")
    on_gate_failure: Literal["fail", "reject"] = Field(
        default="reject", description="reject: register a losing challenger as Rejected; fail: FailStep."
    )


@flow(name="retrain", log_prints=True)
def retrain(params: RetrainParams = RetrainParams()) -> PipelineResult:  # noqa: B008
    """Train a challenger on the new window; promote it only if it beats the champion."""
    result = training_pipeline(PipelineParams.model_validate(params.model_dump()))
    verdict = "promoted to champion" if result.registered and result.registered.champion else "champion kept"
    print(f"retrain of {params.model_name} ({params.reason}): {verdict}; {result.gate.message}")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    return run_flow_cli(retrain, RetrainParams, argv, "python -m flows.retrain", __doc__ or "", where_to_look)


if __name__ == "__main__":
    sys.exit(main())
