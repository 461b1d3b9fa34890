"""The model's performance on a batch: realized from labels, estimated without them.

Realized metrics follow exactly (AUC: to within the width of a score bin) from sums that add up over
partitions, so a batch of any size is scored in one pass on the workers: RMSE, MAE and R² for
regression; AUC (one-vs-rest, macro-averaged for more than two classes), log loss and accuracy for
classifiers.

Estimated metrics need no labels:
- **Classifiers: confidence-based performance estimation (CBPE).** If predicted probabilities are
  calibrated, a row predicted as class c with probability p is right with probability p. So the
  expected accuracy of a batch is the mean calibrated probability of the predicted classes, and the
  expected ROC AUC is the AUC of the batch's scores with each row counted as positive with weight p
  and negative with weight 1 - p. LightGBM's probabilities are not calibrated by themselves: an
  isotonic regression per class maps them to observed frequencies.
- **Regression: direct loss estimation (DLE).** A small LightGBM model learns the champion's absolute
  and squared error from the features and the prediction; its mean over a batch estimates MAE and
  RMSE. It sees errors grow where the champion was unsure before (a region, a regime the features
  show); it cannot see a change in the relation between features and target (concept drift): only
  labels show that.

Both estimators are fitted on the model's test split, because the validation split is part of the
final model's training data (the train step fits on train + validation), where its errors and
confidence are in-sample and too good. For the test period's chunk estimates (calibration), the
estimators are cross-fitted: each of `FOLDS` time blocks is estimated by estimators fitted on the
other blocks, so the chunk estimates are out of sample like a monitored batch's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
from pydantic import BaseModel, Field

from tasks.monitoring.calibration import (
    STRIDES,
    ChunkSize,
    Direction,
    Normal,
    blocks_of,
    chunk_bounds,
    normal_of,
)
from tasks.tabular.featurize import BINARY, FeatureSpec, encode_target, model_matrix

BINS = 1000  # score bins for AUC, uniform in log-odds over ±LOGIT_RANGE
LOGIT_RANGE = 12.0
FOLDS = 3
MAX_BLOCKS = 1000  # blocks of the test period the normal batches are drawn from (evenly spread)
BOOTSTRAP = 200  # normal batches drawn from the test period's blocks
MAX_FIT_ROWS = 10_000  # rows the estimators are fitted on (a sample of the test split beyond that)
MIN_FIT_ROWS = 100
LOSS_MODEL_PARAMS = {
    "objective": "regression",
    "num_leaves": 15,
    "learning_rate": 0.05,
    "min_data_in_leaf": 20,
    "feature_fraction": 0.9,
    "verbosity": -1,
    "deterministic": True,
    "force_row_wise": True,
    "num_threads": 1,
}
LOSS_MODEL_ROUNDS = 100

# Which metric the performance signal watches, and whether higher is better.
PRIMARY = {"regression": "rmse", "binary": "auc", "multiclass": "auc"}
HIGHER_IS_BETTER = {"r2", "auc", "accuracy"}
# Every metric a batch can be judged on (realized; the estimate has rmse, mae, auc and accuracy).
METRICS = {"regression": ("rmse", "mae", "r2"), "classification": ("auc", "log_loss", "accuracy")}


def direction_of(metric: str) -> Direction:
    return "lower-is-worse" if metric in HIGHER_IS_BETTER else "higher-is-worse"


def _bins(scores: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        logit = np.log(scores) - np.log1p(-scores)
    position = (np.clip(logit, -LOGIT_RANGE, LOGIT_RANGE) + LOGIT_RANGE) / (2 * LOGIT_RANGE) * BINS
    return np.clip(position.astype(int), 0, BINS - 1)


def auc_from_histograms(positives: np.ndarray, negatives: np.ndarray) -> float:
    """ROC AUC from (weighted) positive and negative counts per score bin, ties within a bin half."""
    p, n = float(positives.sum()), float(negatives.sum())
    if p <= 0 or n <= 0:
        return math.nan
    below = np.cumsum(negatives) - negatives
    return float((positives * (below + 0.5 * negatives)).sum() / (p * n))


class Sums(BaseModel):
    """Sums over rows from which every metric follows; two batches' sums add up."""

    model_config = {"arbitrary_types_allowed": True}

    rows: int = 0
    # regression, realized
    sum_y: float = 0.0
    sum_y2: float = 0.0
    sum_se: float = 0.0
    sum_ae: float = 0.0
    # classification, realized: per scored class (binary: the second class), counts per score bin
    correct: int = 0
    sum_log_loss: float = 0.0
    positives: np.ndarray | None = None
    negatives: np.ndarray | None = None
    # estimated (no labels used): rows seen, and the expected counterparts of the sums above
    est_rows: int = 0
    est_sum_ae: float = 0.0
    est_sum_se: float = 0.0
    est_correct: float = 0.0
    est_positives: np.ndarray | None = None
    est_negatives: np.ndarray | None = None

    def __add__(self, other: Sums) -> Sums:
        values: dict[str, Any] = {}
        for name in Sums.model_fields:
            a, b = getattr(self, name), getattr(other, name)
            values[name] = b if a is None else a if b is None else a + b
        return Sums(**values)

    def realized(self, task: str) -> dict[str, float]:
        if not self.rows:
            return {}
        if task == "regression":
            total = self.sum_y2 - self.sum_y**2 / self.rows
            return {
                "rmse": math.sqrt(self.sum_se / self.rows),
                "mae": self.sum_ae / self.rows,
                "r2": 1 - self.sum_se / total if total > 0 else math.nan,
            }
        return {
            "auc": _mean_auc(self.positives, self.negatives),
            "log_loss": self.sum_log_loss / self.rows,
            "accuracy": self.correct / self.rows,
        }

    def estimated(self, task: str) -> dict[str, float]:
        if not self.est_rows:
            return {}
        if task == "regression":
            return {
                "rmse": math.sqrt(self.est_sum_se / self.est_rows),
                "mae": self.est_sum_ae / self.est_rows,
            }
        return {
            "auc": _mean_auc(self.est_positives, self.est_negatives),
            "accuracy": self.est_correct / self.est_rows,
        }


def _mean_auc(positives: np.ndarray | None, negatives: np.ndarray | None) -> float:
    if positives is None or negatives is None:
        return math.nan
    aucs = [auc_from_histograms(p, n) for p, n in zip(positives, negatives, strict=True)]
    finite = [a for a in aucs if not math.isnan(a)]
    return float(np.mean(finite)) if finite else math.nan


def class_scores(predicted: pd.DataFrame, spec: FeatureSpec) -> np.ndarray:
    """The model's probabilities as a rows x classes array (in `spec.classes` order)."""
    assert spec.classes is not None
    return predicted[[f"probability_{c}" for c in spec.classes]].to_numpy(dtype="float64")


def _scored_classes(spec: FeatureSpec) -> list[int]:
    """The classes an AUC is computed for: the positive class of two, every class of more."""
    return [1] if spec.task == "binary" else list(range(len(spec.classes or [])))


class RowValues(BaseModel):
    """Every row's contribution to the sums, so that any set of rows (a batch, a block of a test
    period) is summed without predicting again. Scalars per row, and for classifiers each scored
    class's score bin with the row's weight as a positive (realized: 0/1; estimated: calibrated p)."""

    model_config = {"arbitrary_types_allowed": True}

    scalars: dict[str, np.ndarray] = Field(default_factory=dict)
    bins: np.ndarray | None = None  # rows x scored classes
    positive: np.ndarray | None = None  # rows x scored classes, weights in [0, 1]
    prefix: str = ""  # "" realized, "est_" estimated

    def sums(self) -> Sums:
        """The sums over all rows."""
        return self.block_sums([(0, self.size())])[0]

    def size(self) -> int:
        return len(next(iter(self.scalars.values()))) if self.scalars else 0

    def block_sums(self, bounds: list[tuple[int, int]]) -> list[Sums]:
        """The sums of each row range [lo, hi), by prefix sums and one weighted bincount."""
        lo = np.array([b[0] for b in bounds], dtype=int)
        hi = np.array([b[1] for b in bounds], dtype=int)
        totals = {}
        for name, values in self.scalars.items():
            prefix = np.concatenate([[0.0], np.cumsum(values, dtype="float64")])
            totals[name] = prefix[hi] - prefix[lo]
        rows = hi - lo
        histograms: tuple[np.ndarray, np.ndarray] | None = None
        if self.bins is not None and self.positive is not None:
            block = np.full(self.size(), -1)
            for index, (a, b) in enumerate(bounds):
                block[a:b] = index
            inside = block >= 0
            classes = self.bins.shape[1]
            cell = (block[inside, None] * classes + np.arange(classes)) * BINS + self.bins[inside]
            size = len(bounds) * classes * BINS
            shape = (len(bounds), classes, BINS)
            positives = np.bincount(cell.ravel(), weights=self.positive[inside].ravel(), minlength=size)
            negatives = np.bincount(cell.ravel(), weights=(1 - self.positive[inside]).ravel(), minlength=size)
            histograms = positives.reshape(shape), negatives.reshape(shape)
        return [self._sums(totals, rows, histograms, i) for i in range(len(bounds))]

    def _sums(self, totals: dict, rows: np.ndarray, histograms, index: int) -> Sums:
        values: dict[str, Any] = {f"{self.prefix}rows": int(rows[index])}
        values.update({name: float(total[index]) for name, total in totals.items()})
        if "correct" in values:
            values["correct"] = round(values["correct"])
        if histograms is not None:
            values[f"{self.prefix}positives"] = histograms[0][index]
            values[f"{self.prefix}negatives"] = histograms[1][index]
        return Sums(**values)


def realized_rows(labels: pd.Series, predicted: pd.DataFrame, spec: FeatureSpec) -> RowValues:
    """Each labelled row's realized contribution (rows without a label are left out; labels unseen in
    training raise ValueError)."""
    known = labels.notna().to_numpy()
    if spec.task == "regression":
        y = pd.to_numeric(labels[known], errors="coerce").to_numpy(dtype="float64")
        error = y - predicted["prediction"].to_numpy(dtype="float64")[known]
        return RowValues(
            scalars={"sum_y": y, "sum_y2": y * y, "sum_se": error * error, "sum_ae": np.abs(error)}
        )
    codes = encode_target(labels[known], spec)
    proba = class_scores(predicted, spec)[known]
    scored = _scored_classes(spec)
    truth = np.clip(proba[np.arange(len(codes)), codes], 1e-15, 1.0)
    return RowValues(
        scalars={"correct": (proba.argmax(axis=1) == codes).astype(float), "sum_log_loss": -np.log(truth)},
        bins=np.column_stack([_bins(proba[:, c]) for c in scored]),
        positive=np.column_stack([(codes == c).astype(float) for c in scored]),
    )


def realized_sums(labels: pd.Series, predicted: pd.DataFrame, spec: FeatureSpec) -> Sums:
    """Sums for the rows with a label (labels unseen in training raise ValueError)."""
    if not labels.notna().any():
        return Sums()
    return realized_rows(labels, predicted, spec).sums()


class Isotonic(BaseModel):
    """A fitted isotonic map (breakpoints), applied by linear interpolation as scikit-learn does."""

    x: list[float]
    y: list[float]

    def __call__(self, values: np.ndarray) -> np.ndarray:
        return np.interp(values, self.x, self.y)


def fit_isotonic(scores: np.ndarray, outcomes: np.ndarray) -> Isotonic:
    from sklearn.isotonic import IsotonicRegression

    fitted = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(scores, outcomes)
    return Isotonic(x=fitted.X_thresholds_.tolist(), y=fitted.y_thresholds_.tolist())


class ProbabilityCalibration(BaseModel):
    """CBPE's calibration: one isotonic map per class, fitted on the test split."""

    classes: list[Isotonic]

    def apply(self, proba: np.ndarray) -> np.ndarray:
        if proba.shape[1] == BINARY:  # binary: calibrate P(second class), the other is its complement
            positive = self.classes[0](proba[:, 1])
            return np.column_stack([1 - positive, positive])
        calibrated = np.column_stack([iso(proba[:, i]) for i, iso in enumerate(self.classes)])
        total = calibrated.sum(axis=1, keepdims=True)
        uniform = np.full_like(calibrated, 1.0 / calibrated.shape[1])
        return np.where(total > 0, calibrated / np.where(total > 0, total, 1.0), uniform)


def fit_probability_calibration(proba: np.ndarray, codes: np.ndarray) -> ProbabilityCalibration:
    if proba.shape[1] == BINARY:
        return ProbabilityCalibration(classes=[fit_isotonic(proba[:, 1], (codes == 1).astype(float))])
    return ProbabilityCalibration(
        classes=[fit_isotonic(proba[:, c], (codes == c).astype(float)) for c in range(proba.shape[1])]
    )


class LossModel(BaseModel):
    """DLE's models of the champion's absolute and squared error (LightGBM text models)."""

    absolute: str
    squared: str


def loss_features(matrix: pd.DataFrame, predicted: pd.DataFrame) -> pd.DataFrame:
    """What the loss model sees: the champion's features and its prediction."""
    return matrix.assign(__prediction__=predicted["prediction"].to_numpy(dtype="float64"))


def fit_loss_model(features: pd.DataFrame, errors: np.ndarray, seed: int) -> LossModel:
    import lightgbm as lgb

    params = {**LOSS_MODEL_PARAMS, "seed": seed}

    def fit(target: np.ndarray) -> str:
        booster = lgb.train(params, lgb.Dataset(features, target), num_boost_round=LOSS_MODEL_ROUNDS)
        return booster.model_to_string()

    return LossModel(absolute=fit(np.abs(errors)), squared=fit(errors * errors))


_boosters: dict[int, Any] = {}
_KEPT = 8  # boosters a worker keeps loaded


def _booster(text: str):
    import lightgbm as lgb

    key = hash(text)
    if key not in _boosters:
        if len(_boosters) >= _KEPT:
            _boosters.pop(next(iter(_boosters)))
        _boosters[key] = lgb.Booster(model_str=text)
    return _boosters[key]


class Estimator(BaseModel):
    """How a batch's performance is estimated without labels (one of the two is set)."""

    probabilities: ProbabilityCalibration | None = None
    loss: LossModel | None = None
    fitted_rows: int = 0

    def rows(self, matrix: pd.DataFrame, predicted: pd.DataFrame, spec: FeatureSpec) -> RowValues:
        """Each row's expected contribution (no labels used)."""
        if self.loss is not None:
            features = loss_features(matrix, predicted)
            absolute = np.clip(_booster(self.loss.absolute).predict(features, num_threads=1), 0, None)
            squared = np.clip(_booster(self.loss.squared).predict(features, num_threads=1), 0, None)
            return RowValues(scalars={"est_sum_ae": absolute, "est_sum_se": squared}, prefix="est_")
        assert self.probabilities is not None
        proba = class_scores(predicted, spec)
        calibrated = self.probabilities.apply(proba)
        chosen = proba.argmax(axis=1)
        scored = _scored_classes(spec)
        return RowValues(
            scalars={"est_correct": calibrated[np.arange(len(chosen)), chosen]},
            bins=np.column_stack([_bins(proba[:, c]) for c in scored]),
            positive=np.column_stack([calibrated[:, c] for c in scored]),
            prefix="est_",
        )

    def sums(self, matrix: pd.DataFrame, predicted: pd.DataFrame, spec: FeatureSpec) -> Sums:
        """Expected-value sums for a batch's rows (no labels used)."""
        if not len(predicted):
            return Sums()
        return self.rows(matrix, predicted, spec).sums()


def fit_estimator(
    matrix: pd.DataFrame, predicted: pd.DataFrame, labels: pd.Series, spec: FeatureSpec, seed: int
) -> Estimator:
    """CBPE's calibration (classifiers) or DLE's loss model (regression), fitted on these rows."""
    if spec.task == "regression":
        y = pd.to_numeric(labels, errors="coerce").to_numpy(dtype="float64")
        errors = y - predicted["prediction"].to_numpy(dtype="float64")
        return Estimator(
            loss=fit_loss_model(loss_features(matrix, predicted), errors, seed), fitted_rows=len(y)
        )
    codes = encode_target(labels, spec)
    return Estimator(
        probabilities=fit_probability_calibration(class_scores(predicted, spec), codes),
        fitted_rows=len(codes),
    )


def _sample(n: int, seed: int) -> np.ndarray:
    if n <= MAX_FIT_ROWS:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, MAX_FIT_ROWS, replace=False))


class PerformanceCalibration(BaseModel):
    """What `calibrate_performance` learns from the test period."""

    estimator: Estimator | None = None
    chunks: int = 0
    blocks: int = 0
    period: str = Field(default="", description="The test period's first and last day.")
    realized: dict[str, Normal | None] = Field(default_factory=dict)
    estimated: dict[str, Normal | None] = Field(default_factory=dict)
    notes: list[str] = Field(default_factory=list)


def _stack(sums: list[Sums]) -> dict[str, np.ndarray]:
    """The blocks' sums as arrays (block first), for drawing batches of them."""
    out = {}
    for name in Sums.model_fields:
        values = [getattr(s, name) for s in sums]
        if all(v is not None for v in values):
            out[name] = np.stack([np.asarray(v, dtype="float64") for v in values])
    return out


def calibrate_performance(
    test: pd.DataFrame,
    predict: Callable[[pd.DataFrame], pd.DataFrame],
    spec: FeatureSpec,
    chunk: ChunkSize,
    seed: int = 0,
) -> PerformanceCalibration:
    """On the test period (its rows, any order; `predict`: the model): the estimator, and the
    realized and estimated metrics of `BOOTSTRAP` batches of the chunk's size.

    A test period is short (15% of the window: a 90-day window leaves 13 days, two weeks), too short
    for many real chunks. So it is cut into blocks of 1/STRIDES of a chunk (days, for 7D; at most
    MAX_BLOCKS, evenly spread, and only their rows are predicted), and each normal batch is STRIDES
    blocks drawn at random with replacement: every row's contribution is computed once and the
    blocks' sums add up, so a draw costs a sum. Estimates are cross-fitted: the rows of each of
    `FOLDS` time blocks are estimated by estimators fitted on the other blocks, as a monitored batch
    is out of sample."""
    out = PerformanceCalibration()
    rows = test[test[spec.target].notna()]
    rows = rows.iloc[np.argsort(rows[spec.time_column].to_numpy(), kind="stable")].reset_index(drop=True)
    if len(rows):
        times = rows[spec.time_column]
        first, last = times.iloc[0], times.iloc[-1]
        out.period = f"test split, {pd.Timestamp(first).date()} .. {pd.Timestamp(last).date()}"
    blocks = chunk_bounds(
        rows[spec.time_column].to_numpy(), blocks_of(chunk), max_chunks=MAX_BLOCKS, overlap=False
    )
    if len(blocks) < STRIDES:
        out.notes.append(
            f"performance not calibrated: the test period ({out.period or 'no labelled rows'}) is shorter than "
            f"one batch of {chunk.describe()} ({len(blocks)} of its {STRIDES} blocks): lengthen it "
            "(--test-fraction, a longer training window) or check smaller batches"
        )
        blocks = [(0, len(rows))] if len(rows) else []  # the estimator is still fitted on what there is
    keep = np.concatenate([np.arange(lo, hi) for lo, hi in blocks]) if blocks else np.arange(0)
    starts = np.cumsum([0] + [hi - lo for lo, hi in blocks])
    bounds = list(zip(starts[:-1].tolist(), starts[1:].tolist(), strict=True))
    rows = rows.iloc[keep].reset_index(drop=True)
    predicted = predict(rows).reset_index(drop=True) if len(rows) else pd.DataFrame()
    labels = rows[spec.target]
    estimated: RowValues | None = None
    if len(rows) < MIN_FIT_ROWS:
        out.notes.append(
            f"performance not estimated: the test period has {len(rows)} labelled rows (at least {MIN_FIT_ROWS})"
        )
    else:
        matrix = model_matrix(rows, spec)
        pick = _sample(len(rows), seed)
        out.estimator = fit_estimator(matrix.iloc[pick], predicted.iloc[pick], labels.iloc[pick], spec, seed)
        parts = []
        for index, block in enumerate(np.array_split(np.arange(len(rows)), FOLDS)):
            rest = np.setdiff1d(np.arange(len(rows)), block)
            rest = rest[_sample(len(rest), seed + index + 1)]
            fold = (
                fit_estimator(matrix.iloc[rest], predicted.iloc[rest], labels.iloc[rest], spec, seed)
                if len(rest) >= MIN_FIT_ROWS
                else out.estimator
            )
            parts.append(fold.rows(matrix.iloc[block], predicted.iloc[block], spec))
        estimated = _concat(parts)
    if out.notes and out.notes[0].startswith("performance not calibrated"):
        return out
    block_sums = realized_rows(labels, predicted, spec).block_sums(bounds)
    if estimated is not None:
        block_sums = [a + b for a, b in zip(block_sums, estimated.block_sums(bounds), strict=True)]
    stacked = _stack(block_sums)
    draws = np.random.default_rng(seed).integers(0, len(bounds), size=(BOOTSTRAP, STRIDES))
    realized_values: dict[str, list[float]] = {}
    estimated_values: dict[str, list[float]] = {}
    for draw in draws:
        total = Sums(
            **{
                name: (values[draw].sum(axis=0) if values.ndim > 1 else float(values[draw].sum()))
                for name, values in stacked.items()
            }
        )
        for name, value in total.realized(spec.task).items():
            realized_values.setdefault(name, []).append(value)
        for name, value in total.estimated(spec.task).items():
            estimated_values.setdefault(name, []).append(value)
    out.chunks = len(draws)
    out.blocks = len(bounds)
    out.realized = {name: normal_of(v, direction_of(name)) for name, v in realized_values.items()}
    out.estimated = {name: normal_of(v, direction_of(name)) for name, v in estimated_values.items()}
    return out


def _concat(parts: list[RowValues]) -> RowValues:
    """Row values of consecutive row ranges, as one."""
    first = parts[0]
    return RowValues(
        scalars={name: np.concatenate([p.scalars[name] for p in parts]) for name in first.scalars},
        bins=None if first.bins is None else np.concatenate([p.bins for p in parts]),
        positive=None if first.positive is None else np.concatenate([p.positive for p in parts]),
        prefix=first.prefix,
    )
