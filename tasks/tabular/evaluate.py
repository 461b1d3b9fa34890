"""The evaluation step: challenger and current champion scored on the same held-out test period."""

from __future__ import annotations

import tempfile
from pathlib import Path

from pydantic import BaseModel

from tasks.steps import CacheConfig, RetryPolicy, current_step, lineage, processing_step
from tasks.steps.compute import dask_client, threads_per_task
from tasks.steps.refs import ModelRef
from tasks.steps.tags import CHAMPION_VERSION_TAG
from tasks.tabular import modeling
from tasks.tabular.prepare import Splits

GATE_METRIC = {"regression": "r2", "binary": "auc", "multiclass": "auc"}


class Evaluation(BaseModel):
    metrics: dict[str, float]
    champion_metrics: dict[str, float] | None = None
    champion_version: str | None = None
    gate_metric: str


@processing_step(
    name="evaluate",
    cache=CacheConfig(),
    retry=RetryPolicy(attempts=3),
    preload=("matplotlib.figure", "matplotlib.backends.backend_agg"),
)
def evaluate(model: ModelRef, splits: Splits, model_name: str, champion: str | None) -> Evaluation:
    """Score the challenger and the champion version (None: no comparison) through `mlflow.pyfunc` on a
    worker, as a user would load them. The flow names the champion, so the cache key includes it."""
    from prefect.artifacts import create_markdown_artifact

    step = current_step()
    pipeline = lineage.current_pipeline()
    client = dask_client()
    jobs = {"challenger": model.uri}
    if champion is not None:
        jobs["champion"] = f"models:/{model_name}/{champion}"
    futures = {
        role: client.submit(
            modeling.evaluate_model,
            uri,
            pipeline.tracking_uri,
            pipeline.registry_uri,
            splits.test,
            splits.features,
            threads_per_task(client, len(jobs)),
            pure=False,
        )
        for role, uri in jobs.items()
    }
    scores = {"challenger": futures["challenger"].result()}
    if champion is not None:
        try:
            scores["champion"] = futures["champion"].result()
        except Exception as exc:
            raise RuntimeError(
                f"the champion {model_name} v{champion} cannot score this test data, so the challenger "
                f"cannot be compared with it ({type(exc).__name__}: {str(exc)[-400:]}). Was it trained on another "
                "table? Use another --model-name, or move the alias yourself."
            ) from exc
    names = [k for k, v in scores["challenger"].items() if isinstance(v, float)]
    metrics = {k: scores["challenger"][k] for k in names}
    champion_metrics = {k: scores["champion"][k] for k in names} if champion is not None else None
    step.log_metrics({f"test_{k}": v for k, v in metrics.items()})
    if champion_metrics:
        step.log_metrics({f"champion_test_{k}": v for k, v in champion_metrics.items()})
        step.set_tags({CHAMPION_VERSION_TAG: str(champion)})
    header = "| metric | challenger |" + (f" champion v{champion} |" if champion else "")
    rule = "|---|---|" + ("---|" if champion else "")
    rows = [
        f"| {k} | {metrics[k]:.4f} |" + (f" {champion_metrics[k]:.4f} |" if champion_metrics else "")
        for k in names
    ]
    table = "\n".join([header, rule, *rows])
    step.log_text(table + "\n", "evaluation.md")
    create_markdown_artifact(
        key="evaluation",
        markdown=f"### Test period {splits.boundaries['test_start'][:10]} .. {splits.boundaries['end'][:10]} "
        f"({splits.test.rows:,} rows)\n\n{table}\n",
        description="challenger vs champion on the same held-out test data",
    )
    _log_plot(step, scores, splits)
    return Evaluation(
        metrics=metrics,
        champion_metrics=champion_metrics,
        champion_version=str(champion) if champion else None,
        gate_metric=GATE_METRIC[splits.features.task],
    )


def _log_plot(step, scores: dict[str, dict], splits: Splits) -> None:
    """Daily actual vs predicted over the test period (regression), as a PNG in the step's run."""
    if splits.features.task != "regression":
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    fig, ax = plt.subplots(figsize=(10, 4))
    daily = scores["challenger"]["daily"]
    days = list(daily)
    # Dates, not strings: a text axis gets one tick label per day (39 s for 5,600 days, measured).
    x = pd.to_datetime(days)
    ax.plot(x, [daily[d][0] for d in days], label="actual", color="black", linewidth=1.5)
    for role, result in scores.items():
        ax.plot(x, [result["daily"][d][1] for d in days], label=f"{role} prediction", linewidth=1)
    ax.set_title(f"Daily mean {splits.features.target}: actual vs predicted (test period)")
    ax.legend()
    ax.tick_params(axis="x", labelrotation=45)
    fig.tight_layout()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "test_predictions.png"
        fig.savefig(path, dpi=100)
        step.client.log_artifact(step.run_id, str(path))
    plt.close(fig)
