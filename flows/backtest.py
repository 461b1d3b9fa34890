"""The backtest: which retrain policy pays on your data? Replays a table through time.

    python -m flows.backtest --help
    python -m flows.backtest                                   # the bike data, weekly, every policy
    python -m flows.backtest --data sales.parquet --target units --time-column day \\
        --initial-days 120 --batch-every 7D --label-delay 7D --policies never schedule:4 performance always

The first champion trains on the first `--initial-days` of the table (its LightGBM parameters tuned
once there, as the pipeline's tune step does). The rest is walked in batches of `--batch-every`;
for each policy, every batch is checked against that policy's champion exactly as the monitor would
check it, the champion is scored on the batch, and when the policy calls for it a challenger is
trained on the labelled data seen so far (`--window-days`: only the last N days) with the same
parameters and promoted if it beats the champion on its own test period (the retrain flow's gate).
Labels arrive `--label-delay` after a row's time: a policy only uses those that have arrived.

Output per policy: mean and per-batch metric, retrains, alarms, false alarms (on batches inside the
initial window), and with `--change-points` the detection delay in batches. A markdown table, JSON
and a picture of the metric over time, logged to one MLflow run and shown as Prefect artifacts.
"""

from __future__ import annotations

if __name__ == "__main__":  # before the imports: the collector paused, the warm pool or the Prefect server
    from infra.command import begin_command

    begin_command(__spec__)

import json
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, cast
from uuid import UUID

from prefect import get_run_logger
from pydantic import BaseModel, Field, field_validator

from flows.pipeline import TableParams
from tasks.monitoring.backtest import (
    DATA_DRIVEN,
    Batch,
    Replay,
    ReplayModel,
    fit_window,
    load_table,
    metric_for,
    parse_delay,
    plan_batches,
)
from tasks.monitoring.backtest_report import PolicySummary, plot, results_table, summarise_runs
from tasks.monitoring.calibration import ChunkSize, parse_chunk
from tasks.monitoring.policies import SignalSettings, parse_policy
from tasks.steps import DatasetRef, TuningResult, TuningSpec, current_pipeline, lineage, markdown, pipeline
from tasks.steps.cli import exit_process
from tasks.steps.compute import dask_client
from tasks.steps.errors import DataValidationError
from tasks.steps.settings import get_settings
from tasks.tabular.data import TableSpec, read_table
from tasks.tabular.modeling import DEFAULT_OBJECTIVE, MAXIMIZE
from tasks.tabular.prepare import SplitSpec, prepare, validate_input
from tasks.tabular.train import TrainingSpec, default_search_space, tune

if TYPE_CHECKING:
    import pandas as pd

ALL_POLICIES = [
    "never",
    "schedule:4",
    "drift",
    "calibrated-drift",
    "performance",
    "drift-and-performance",
    "always",
]


class BacktestParams(TableParams, SignalSettings):
    """The table, the replay and the policies to compare."""

    initial_days: int = Field(
        default=90, ge=1, le=100_000, description="Days of the first champion's training window."
    )
    batch_every: str = Field(
        default="7D",
        description="Batch size: a period (7D, 1D, 12h) or a number of rows; also the calibration chunk.",
    )
    window_days: int | None = Field(
        default=None,
        ge=1,
        le=100_000,
        description="Retrain on the last N days only; default: all data seen so far.",
    )
    label_delay: str = Field(
        default="0", description="How long after a row's time its label arrives (0, 7D, 36h)."
    )
    policies: list[str] = Field(
        default_factory=lambda: list(ALL_POLICIES),
        description="Policies to compare: never, always, schedule:N (batches) or schedule:ND (days), drift, "
        "calibrated-drift, performance, drift-and-performance.",
    )
    change_points: list[date] = Field(
        default_factory=list, description="Known change points (dates), for the detection delay."
    )
    valid_fraction: float = Field(
        default=0.15, gt=0, lt=0.5, description="Time share of each training window for validation."
    )
    test_fraction: float = Field(
        default=0.15, gt=0, lt=0.5, description="Time share held out for test (and calibration)."
    )
    n_trials: int = Field(
        default=16, ge=1, le=10_000, description="Tuning trials, once, on the initial window."
    )
    parallel_trials: int = Field(default=2, ge=1, le=256, description="Tuning trials at once on the workers.")
    num_boost_round: int = Field(default=400, ge=1, le=100_000, description="Most trees a trial may grow.")
    early_stopping_rounds: int = Field(
        default=30, ge=1, description="Rounds without gain before a trial stops."
    )
    champion_margin: float = Field(
        default=0.001,
        ge=0,
        description="A challenger must beat the champion's gate metric by this to be promoted.",
    )
    seed: int = Field(default=42, description="Seed of the tuner and of LightGBM.")

    @field_validator("policies")
    @classmethod
    def _policies(cls, values: list[str]) -> list[str]:
        texts = [parse_policy(v).text for v in (p for value in values for p in value.split(",")) if v.strip()]
        if not texts:
            raise ValueError("name at least one policy")
        return list(dict.fromkeys(texts))

    @field_validator("batch_every")
    @classmethod
    def _every(cls, value: str) -> str:
        return parse_chunk(value).text

    @field_validator("label_delay")
    @classmethod
    def _delay(cls, value: str) -> str:
        parse_delay(value)
        return value


class BacktestResult(BaseModel):
    metric: str
    batches: int
    inside_batches: int
    first_batch: str
    last_batch: str
    policies: list[PolicySummary]
    table: str
    models_trained: int
    tuned_params: dict[str, float | int]
    num_boost_round: int
    seconds: float
    mlflow_run_id: str
    plot_uri: str = ""  # set once the picture is logged
    plot_link: str = ""
    prefect_flow_run: dict[str, str]


def summarise(result: BacktestResult) -> str:
    return "\n".join(
        [
            f"Backtest:        {result.batches} batches ({result.first_batch[:10]} .. {result.last_batch[:10]}), "
            f"{result.inside_batches} inside the initial window; {result.models_trained} models trained in "
            f"{result.seconds:.0f} s",
            "",
            result.table,
            "",
            f"Picture:         {result.plot_link}",
            f"MLflow run:      {result.mlflow_run_id}",
        ]
    )


@pipeline(
    name="backtest",
    params=BacktestParams,
    summary=summarise,
    after_bad_input="nothing replayed",
    reads=lambda params: [params.data],
)
def backtest(params: BacktestParams) -> BacktestResult:
    """Replay the table through time for each policy; compare error against retrains."""
    logger = get_run_logger()
    settings = get_settings()
    table = params.table()
    every = parse_chunk(params.batch_every)
    policies = [parse_policy(p) for p in params.policies]
    started = time.perf_counter()
    raw = validate_input(table, settings.data_access, settings.datasets_root)
    frame = load_table(read_table(raw).compute(), table, raw.uri)
    initial_end = (
        frame[table.time_column].iloc[0].normalize() + timedelta(days=params.initial_days)
    ).to_pydatetime()
    delay = parse_delay(params.label_delay)
    batches, inside = _labelled_batches(frame, table, initial_end, every, delay, raw.uri)
    split = SplitSpec(
        end=(initial_end - timedelta(days=1)).date(),
        valid_fraction=params.valid_fraction,
        test_fraction=params.test_fraction,
    )
    task, best = _tuned_on_the_first_window(raw, table, split, params)
    rounds = int(best.best_metrics.get("best_iteration", params.num_boost_round))
    metric = metric_for(task, params)
    logger.info(
        "backtest: %d batches of %s after %s (%d inside the initial window), %d policies; every retrain with "
        "the tuned parameters and %d trees",
        len(batches),
        every.describe(),
        initial_end.date(),
        len(inside),
        len(policies),
        rounds,
    )

    client = dask_client()
    shared = client.scatter(frame, broadcast=True)

    def train(ends: list[datetime]) -> dict[str, ReplayModel]:
        threads = 1 if len(ends) > 1 else 0  # side by side: a thread each; alone: all a worker has
        futures = [
            client.submit(
                fit_window,
                shared,
                end,
                params.window_days,
                table,
                task,
                split,
                best.best_params,
                rounds,
                params.seed,
                every,
                threads,
                pure=False,
            )
            for end in ends
        ]
        return {model.key: model for model in client.gather(futures)}

    replay = Replay(frame, table, task, batches, inside, delay, params, metric, params.champion_margin, train)
    runs = replay.run(policies, _progress(replay, len(batches)))
    summaries = summarise_runs(runs, batches, inside, params.change_points, set(DATA_DRIVEN))
    _warn_blind(replay.model(batches[0].start), summaries)
    result = BacktestResult(
        metric=metric,
        batches=len(batches),
        inside_batches=len(inside),
        first_batch=str(batches[0].start),
        last_batch=str(batches[-1].start),
        policies=summaries,
        table=results_table(summaries, metric, params.change_points),
        models_trained=len(replay.models),
        tuned_params=best.best_params,
        num_boost_round=rounds,
        seconds=time.perf_counter() - started,
        mlflow_run_id=current_pipeline().run_id,
        prefect_flow_run=lineage.prefect_flow_run_tags(),
    )
    title = (
        f"{Path(raw.uri).name}: {metric} of the model in service, batches of {every.describe()}, "
        f"label delay {params.label_delay}"
    )
    result = _log_results(result, batches, inside, title, params.change_points)
    _announce(result, raw, every.describe(), params.label_delay)
    print(
        f"backtest: {result.models_trained} models trained in {result.seconds:.0f} s; picture: {result.plot_link}"
    )
    return result


def _warn_blind(first: ReplayModel, summaries: list[PolicySummary]) -> None:
    """What the first champion could not calibrate, and each policy left unable to fire on batches."""
    logger = get_run_logger()
    for note in getattr(first.calibration, "notes", None) or []:
        logger.warning("the first champion's baseline: %s", note)
    for s in summaries:
        if s.blind:
            logger.warning(
                "policy %s could not judge %d of %d batches, so it could not fire on them: %s",
                s.policy,
                s.blind,
                len(s.scores),
                s.blind_reason,
            )


def _progress(replay: Replay, batches: int) -> Callable[[int, int], None]:
    """A Prefect progress artifact for the replay, and a log line every tenth of the batches."""
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    logger = get_run_logger()
    progress = create_progress_artifact(progress=0.0, description=f"backtest: {batches} batches")
    every = max(1, batches // 10)

    def report(done: int, total: int) -> None:
        update_progress_artifact(cast(UUID, progress), progress=100.0 * done / total)
        if done % every == 0 or done == total:
            logger.info("batch %d of %d (%d models trained so far)", done, total, len(replay.models))

    return report


def _labelled_batches(
    frame: pd.DataFrame, table: TableSpec, initial_end: datetime, every: ChunkSize, delay: timedelta, uri: str
) -> tuple[list[Batch], list[Batch]]:
    """The batches after the first champion's window (and those inside it); each must have labels,
    since the backtest scores the model in service on them."""
    labelled = frame[table.target].notna().to_numpy()
    batches, inside = plan_batches(frame[table.time_column].to_numpy(), initial_end, every, uri, delay)
    for batch in batches:
        if not labelled[batch.lo : batch.hi].any():
            raise DataValidationError(
                uri,
                f"the batch {batch.start:%Y-%m-%d %H:%M} .. {batch.end:%Y-%m-%d %H:%M} has no values of the target: "
                "the backtest scores the model in service on every batch's labels",
                table.target,
            )
    return batches, inside


def _tuned_on_the_first_window(
    raw: DatasetRef, table: TableSpec, split: SplitSpec, params: BacktestParams
) -> tuple[str, TuningResult]:
    """The task and the hyperparameters every retrain of the replay uses: tuned once, on the first
    champion's window, with the pipeline's own steps."""
    splits = prepare(raw, table, split)
    task = splits.features.task
    objective = DEFAULT_OBJECTIVE[task]
    training = TrainingSpec(
        num_boost_round=params.num_boost_round,
        early_stopping_rounds=params.early_stopping_rounds,
        seed=params.seed,
    )
    tuning = TuningSpec(
        space=default_search_space(),
        n_trials=params.n_trials,
        parallel=params.parallel_trials,
        objective=objective,
        direction="maximize" if objective in MAXIMIZE else "minimize",
        seed=params.seed,
    )
    return task, tune(splits.train, splits.valid, splits.features, tuning, training)


def _log_results(
    result: BacktestResult, batches: list[Batch], inside: list[Batch], title: str, change_points: list[date]
) -> BacktestResult:
    """The picture, the table and the JSON as MLflow artifacts of the execution, its metrics per
    policy; the result with the picture's URI and link."""
    run = current_pipeline()
    client = run.client()
    metric, summaries = result.metric, result.policies
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "backtest"
        plot(summaries, batches, metric, folder / "metric_over_time.png", title, change_points)
        details = {
            "metric": metric,
            "batches": [b.model_dump(mode="json") for b in batches],
            "inside_batches": [b.model_dump(mode="json") for b in inside],
            "policies": [s.model_dump(mode="json") for s in summaries],
            "tuned_params": result.tuned_params,
            "num_boost_round": result.num_boost_round,
            "models_trained": result.models_trained,
            "seconds": result.seconds,
        }
        (folder / "results.json").write_text(json.dumps(details, indent=1, default=str))
        (folder / "results.md").write_text(f"# Backtest\n\n{markdown.text(title)}\n\n{result.table}\n")
        client.log_artifacts(run.run_id, str(folder), "backtest")
    artifact_uri = client.get_run(run.run_id).info.artifact_uri.rstrip("/")
    plot_uri = f"{artifact_uri}/backtest/metric_over_time.png"
    link = lineage.artifact_link(
        run.tracking_uri, run.experiment_id, run.run_id, plot_uri, "backtest/metric_over_time.png"
    )
    lineage.log_metrics(
        client,
        run.run_id,
        {
            **{f"{s.policy}.mean_{metric}": s.mean for s in summaries},
            **{f"{s.policy}.retrains": s.retrains for s in summaries},
            **{f"{s.policy}.false_alarms": s.false_alarms for s in summaries if s.false_alarms is not None},
            "batches": len(batches),
            "models_trained": result.models_trained,
            "seconds": result.seconds,
        },
    )
    return result.model_copy(update={"plot_uri": plot_uri, "plot_link": link})


def _announce(result: BacktestResult, raw: DatasetRef, every: str, label_delay: str) -> None:
    """The results where people look in Prefect: the table, a link to the picture, the summary."""
    from prefect.artifacts import create_link_artifact, create_markdown_artifact

    metric, link = result.metric, result.plot_link
    create_markdown_artifact(
        key="backtest",
        markdown=f"### Backtest: {result.batches} batches of {markdown.text(every)}, label delay "
        f"{markdown.text(label_delay)}\n\n{result.table}\n\n"
        f"Metric over time, retrains marked: {markdown.link('metric_over_time.png', link)}\n",
        description=f"{len(result.policies)} policies on {raw.uri}",
    )
    create_link_artifact(
        key="backtest-picture",
        link=link,
        link_text=f"{metric} over time per policy, retrains marked",
        description="PNG logged to MLflow with the table and the JSON (backtest/)",
    )
    lineage.note("Input", f"{raw.location} (sha256 {raw.digest[:12]}), {result.batches} batches of {every}")
    for s in result.policies:
        lineage.note(
            f"Policy {s.policy}",
            f"mean {metric} {s.mean:.4g}, {s.retrains} retrains, {s.alarms} alarms"
            + (f", {s.false_alarms} false alarms" if s.false_alarms is not None else ""),
        )
    lineage.note("Picture", f"{metric} over time per policy, retrains marked", link)


def main(argv: Sequence[str] | None = None) -> int:
    return backtest.main(argv)


if __name__ == "__main__":
    exit_process(main())
