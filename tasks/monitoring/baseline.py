"""The monitoring baseline, made at training time (Model Monitor's baselining job) and found through lineage.

Each registered version carries a `baseline.uri` tag: an MLflow artifact folder with `profile.json`
(the training data's URI and digest, the feature spec, per-column statistics of the training split
and of the model's predictions on it, the calibration of every signal on chunks of the training
window and the estimator of performance without labels; see `tasks.monitoring.calibration`) and
`reference.parquet` (a row sample for the Evidently report). A drift check therefore never re-reads
or re-profiles the training set, and never needs a path that is written down anywhere but the
registry.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, Field

from tasks.monitoring import worker
from tasks.monitoring.calibration import Calibration, parse_chunk
from tasks.monitoring.drift_stats import ColumnProfile
from tasks.monitoring.performance import Estimator
from tasks.steps import CacheConfig, RetryPolicy, current_step, lineage, processing_step
from tasks.steps.compute import dask_client
from tasks.steps.errors import NotInRegistry
from tasks.steps.model import find_champion
from tasks.steps.refs import DatasetRef, ModelRef, file_urls
from tasks.steps.tags import BASELINE_RUN_TAG, BASELINE_TAG, METRIC_TAG_PREFIX
from tasks.tabular.featurize import FeatureSpec
from tasks.tabular.prepare import SPLITS, Splits

if TYPE_CHECKING:
    import pandas as pd
    from mlflow import MlflowClient

ARTIFACT_DIR = "baseline"


class Profile(BaseModel):
    """profile.json: everything a drift check needs to know about what the model was trained on."""

    model_uri: str
    train: DatasetRef
    features: FeatureSpec
    columns: dict[str, ColumnProfile]
    sample_rows: int
    calibration: Calibration | None = Field(
        default=None, description="Normal ranges of every signal; None in baselines made before calibration."
    )
    estimator: Estimator | None = Field(default=None, description="Estimates performance without labels.")


class Baseline(BaseModel):
    """Where a version's baseline is (artifact URI), as the baseline step returns it."""

    uri: str
    run_id: str
    train: DatasetRef
    columns: list[str] = Field(description="Monitored columns: features, target, prediction.")


@processing_step(name="baseline", cache=CacheConfig(), retry=RetryPolicy(attempts=3))
def baseline(model: ModelRef, splits: Splits, chunk: str = "7D", seed: int = 0) -> Baseline:
    """Profile the training split and the model's predictions on it (predicted file by file on the
    workers, profiled on one), and calibrate every signal on chunks of `chunk` (the monitored batch
    size) of the window, on the same worker; store it in MLflow."""
    from distributed import wait
    from prefect import get_run_logger

    step = current_step()
    pipeline = lineage.current_pipeline()
    client = dask_client()
    size = parse_chunk(chunk)
    location = worker.ModelLocation(
        uri=model.uri, tracking_uri=pipeline.tracking_uri, registry_uri=pipeline.registry_uri
    )
    files = {name: file_urls(getattr(splits, name).uri) for name in SPLITS}
    predicted = [
        client.submit(worker.predict_file, f, splits.features, location, pure=False) for f in files["train"]
    ]
    wait(predicted)  # then the two halves start together, one on each worker
    performance = client.submit(  # needs only the test split
        worker.performance_from_files, files["test"], splits.features, location, size, seed, pure=False
    )
    drift = client.submit(  # the profile and the drift calibration, where the predictions are
        worker.baseline_from_files, files, predicted, splits.features, location, size, seed, pure=False
    )
    parts = worker.with_performance(drift.result(), performance.result(), size)
    profile = Profile(
        model_uri=model.uri,
        train=splits.train,
        features=splits.features,
        columns=parts.profiles,
        sample_rows=len(parts.sample),
        calibration=parts.calibration,
        estimator=parts.estimator,
    )
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / ARTIFACT_DIR
        folder.mkdir()
        (folder / "profile.json").write_text(profile.model_dump_json(indent=1))
        parts.sample.to_parquet(folder / "reference.parquet", index=False)
        step.client.log_artifacts(step.run_id, str(folder), ARTIFACT_DIR)
    uri = step.artifact_uri(ARTIFACT_DIR)
    calibration = parts.calibration
    step.log_params({"monitoring_chunk": size.text})
    step.log_metrics(
        {
            "reference_rows": splits.train.rows or 0,
            "reference_sample_rows": len(parts.sample),
            "calibration_drift_chunks": calibration.drift_chunks,
            "calibration_performance_chunks": calibration.performance_chunks,
        }
    )
    logger = get_run_logger()
    logger.info(
        "baseline: %d columns profiled over %s training rows, %d-row reference sample; calibrated on %d chunks "
        "of %s (drift) and %d of the test period (performance) -> %s",
        len(parts.profiles),
        f"{splits.train.rows:,}",
        len(parts.sample),
        calibration.drift_chunks,
        size.describe(),
        calibration.performance_chunks,
        uri,
    )
    for note in calibration.notes:
        logger.warning("baseline: %s", note)
    return Baseline(uri=uri, run_id=step.run_id, train=splits.train, columns=list(parts.profiles))


class ChampionBaseline(BaseModel):
    """A registered version and its baseline, loaded for a drift check."""

    model_config = {"arbitrary_types_allowed": True}

    model_name: str
    version: str
    model_uri: str
    metrics: dict[str, float]
    profile: Profile
    reference: pd.DataFrame | None = Field(default=None, description="The row sample, when asked for.")
    baseline_uri: str


_FILES: dict[tuple[str, str], tuple[Profile, pd.DataFrame | None]] = {}
_FILES_KEPT = 4


def _baseline_files(
    client: MlflowClient, run_id: str, with_reference: bool
) -> tuple[Profile, pd.DataFrame | None]:
    """A baseline run's profile (and reference sample), downloaded once per process: a monitor run
    asks three times (the flow, the drift check, the report), and a run's artifacts never change.
    The last few baselines are kept."""
    import pandas as pd

    key = (str(client.tracking_uri), run_id)
    kept = _FILES.get(key)
    if kept is not None and (kept[1] is not None or not with_reference):
        return kept
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(client.download_artifacts(run_id, f"{ARTIFACT_DIR}/profile.json", tmp))
        profile = Profile.model_validate(json.loads(local.read_text()))
        reference = None
        if with_reference:
            sample = client.download_artifacts(run_id, f"{ARTIFACT_DIR}/reference.parquet", tmp)
            reference = pd.read_parquet(sample)
    _FILES.pop(key, None)
    _FILES[key] = (profile, reference)
    while len(_FILES) > _FILES_KEPT:
        _FILES.pop(next(iter(_FILES)))
    return profile, reference


def load_baseline(
    client: MlflowClient, model_name: str, version: str | None = None, with_reference: bool = False
) -> ChampionBaseline:
    """The champion's (or a given version's) baseline, found through the registry's lineage tags;
    `with_reference`: also the row sample behind the Evidently report."""
    import pandas as pd  # noqa: F401  (ChampionBaseline's `pd.DataFrame` is resolved when it is first made)

    if version is None:
        found = find_champion(client, model_name)
        if found is None:
            raise NotInRegistry(
                f"model {model_name!r} has no @champion version in the registry: "
                "train one first (python -m flows.pipeline)"
            )
    else:
        found = client.get_model_version(model_name, version)
    uri, run_id = found.tags.get(BASELINE_TAG), found.tags.get(BASELINE_RUN_TAG)
    if not uri or not run_id:
        raise NotInRegistry(
            f"{model_name} v{found.version} has no {BASELINE_TAG!r} tag: it was registered before baselines "
            "were stored; retrain it to monitor it"
        )
    profile, reference = _baseline_files(client, run_id, with_reference)
    metrics = {
        k.removeprefix(METRIC_TAG_PREFIX): float(v)
        for k, v in found.tags.items()
        if k.startswith(METRIC_TAG_PREFIX)
    }
    return ChampionBaseline(
        model_name=model_name,
        version=str(found.version),
        model_uri=f"models:/{model_name}/{found.version}",
        metrics=metrics,
        profile=profile,
        reference=reference,
        baseline_uri=uri,
    )
