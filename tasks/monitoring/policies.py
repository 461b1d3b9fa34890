"""The retrain decision as a named policy: which signals it listens to, and when they call for a retrain.

Every monitored batch yields the same signals (`tasks.monitoring.verdict`); a policy only chooses among them:

| policy | retrains when |
|---|---|
| `never` | never |
| `always` | after every batch |
| `schedule:N` / `schedule:14D` | N batches (or that long) after the champion was trained |
| `drift` | Evidently's fixed rule, as before calibration: at least `drift_share` of the feature columns score >= 0.1, or a `must_not_drift` column does, or the predictions do, or R² / accuracy fell more than `max_quality_drop` below the champion's test value |
| `calibrated-drift` | the importance-weighted share of inputs beyond their calibrated thresholds reaches `weighted_drift_share`, or the predictions drift beyond theirs, or a `must_not_drift` column does |
| `performance` | the model's metric is beyond its calibrated range: realized when the batch has labels, else estimated |
| `drift-and-performance` | drift proposes, performance confirms: calibrated drift (data or predictions) and the performance signal together. It cannot see concept drift, where the inputs do not move |

Pure functions, no I/O: the monitor flow and the backtest decide the same way.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, Field, field_validator

from tasks.monitoring.calibration import DRIFT_SD
from tasks.monitoring.performance import METRICS

PolicyName = Literal[
    "never", "always", "schedule", "drift", "calibrated-drift", "performance", "drift-and-performance"
]
NAMES: tuple[str, ...] = PolicyName.__args__  # type: ignore[attr-defined]
DEFAULT_POLICY = "performance"
PERFORMANCE_SD = 1.5  # the most sensitive band within 5% false alarms on stationary data (README)

# The signals, by the names the report, the MLflow run and the event use.
EVIDENTLY_SHARE = "evidently-share"
MUST_NOT_DRIFT = "must-not-drift"
FIXED_MUST_NOT_DRIFT = "evidently-must-not-drift"
FIXED_PREDICTION_DRIFT = "evidently-prediction-drift"
QUALITY_DROP = "quality-drop"
DATA_DRIFT = "data-drift"
PREDICTION_DRIFT = "prediction-drift"
PERFORMANCE = "performance"
SCHEDULE = "schedule"

LISTENS_TO: dict[str, tuple[str, ...]] = {
    "never": (),
    "always": (),
    "schedule": (SCHEDULE,),
    "drift": (EVIDENTLY_SHARE, FIXED_MUST_NOT_DRIFT, FIXED_PREDICTION_DRIFT, QUALITY_DROP),
    "calibrated-drift": (DATA_DRIFT, PREDICTION_DRIFT, MUST_NOT_DRIFT),
    "performance": (PERFORMANCE,),
    "drift-and-performance": (DATA_DRIFT, PREDICTION_DRIFT, PERFORMANCE),
}


class Policy(BaseModel):
    """A parsed policy: its name, and for `schedule` how often."""

    model_config = {"frozen": True}

    name: PolicyName
    every_batches: int | None = None
    every_days: float | None = None

    @property
    def text(self) -> str:
        if self.name != "schedule":
            return self.name
        return f"schedule:{self.every_batches}" if self.every_batches else f"schedule:{self.every_days:g}D"


def parse_policy(text: str) -> Policy:
    """`performance`, `schedule:4` (batches), `schedule:14D` (days); ValueError naming the choices."""
    text = str(text).strip()
    name, _, arg = text.partition(":")
    if name not in NAMES:
        raise ValueError(
            f"unknown policy {text!r}; the policies are {', '.join(NAMES)} (schedule:N or schedule:ND)"
        )
    if name != "schedule":
        if arg:
            raise ValueError(f"policy {name!r} takes no argument (got {text!r})")
        return Policy(name=name)
    if arg.isdigit() and int(arg) >= 1:
        return Policy(name="schedule", every_batches=int(arg))
    if arg[:-1].replace(".", "", 1).isdigit() and arg[-1:] in ("D", "d") and float(arg[:-1]) > 0:
        return Policy(name="schedule", every_days=float(arg[:-1]))
    raise ValueError(f"schedule needs how often: schedule:N (batches) or schedule:ND (days), not {text!r}")


class PerformanceSettings(BaseModel):
    """The performance signal's knobs (the monitor's, the backtest's and flows.label's parameters
    inherit them)."""

    performance_sd: float = Field(
        default=PERFORMANCE_SD,
        ge=0,
        le=100,
        description="Performance: the metric is degraded beyond the mean + this many standard deviations "
        "(for AUC: minus) of its values on chunks of the version's test period.",
    )
    performance_metric: str | None = Field(
        default=None,
        description="Metric the performance signal watches; default rmse (regression), auc (classes).",
    )

    @field_validator("performance_metric")
    @classmethod
    def _known_metric(cls, value: str | None) -> str | None:
        if value is None or any(value in names for names in METRICS.values()):
            return value
        choices = "; ".join(f"{task}: {', '.join(names)}" for task, names in METRICS.items())
        raise ValueError(f"unknown metric {value!r}; the metrics are {choices}")


class SignalSettings(PerformanceSettings):
    """The knobs of every policy's signals (the backtest's parameters inherit them)."""

    drift_share: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description="Policy drift: share of feature columns that must drift (score >= 0.1).",
    )
    must_not_drift: list[str] = Field(
        default_factory=list,
        description="Columns whose drift alone counts as drift (policies drift, calibrated-drift).",
    )
    prediction_drift: bool = Field(
        default=True, description="Drift of the champion's predictions counts as drift."
    )
    max_quality_drop: float = Field(
        default=0.1,
        ge=0,
        description="Policy drift, labelled batches: the largest drop of R² (regression) or accuracy "
        "(classification) below the champion's training-time test value.",
    )
    drift_sd: float = Field(
        default=DRIFT_SD,
        ge=0,
        le=100,
        description="Calibrated drift: a column drifts when its score exceeds the mean + this many standard "
        "deviations of its scores on the training window's chunks.",
    )
    weighted_drift_share: float = Field(
        default=0.3,
        gt=0,
        le=1,
        description="Calibrated drift: the share of the model's importance (LightGBM gain) on drifted inputs "
        "that counts as data drift.",
    )
    ignore_columns: list[str] = Field(
        default_factory=list, description="Columns left out of every verdict (still scored and reported)."
    )


PolicyText = Annotated[str, AfterValidator(lambda value: parse_policy(value).text)]
POLICY_HELP = (
    f"When a batch calls for a retrain: {', '.join(NAMES)} (schedule:N batches or schedule:ND days)."
)


class PolicySettings(SignalSettings):
    """A policy and its signals' knobs (the monitor's parameters inherit them)."""

    policy: PolicyText = Field(default=DEFAULT_POLICY, description=POLICY_HELP)

    def parsed(self) -> Policy:
        return parse_policy(self.policy)


def settings_of(params: BaseModel) -> PolicySettings:
    """The policy settings out of a flow's parameters (which extend PolicySettings or SignalSettings)."""
    return PolicySettings.model_validate(params.model_dump(include=set(PolicySettings.model_fields)))


class Signal(BaseModel):
    """One reason a batch may call for a retrain: its value, the threshold it is held to, and why."""

    name: str
    value: float | None = None
    threshold: float | None = None
    fired: bool = False
    basis: str = Field(description="What was compared, in words (shown in reports and events).")

    def line(self) -> str:
        shown = "n/a" if self.value is None or math.isnan(self.value) else f"{self.value:.4g}"
        limit = "" if self.threshold is None else f" (threshold {self.threshold:.4g})"
        return f"{self.name}: {shown}{limit}: {self.basis}"


class PolicyContext(BaseModel):
    """What a schedule needs: how long the champion has been in service."""

    batches_since_training: int = Field(
        default=1, description="Batches checked against it, this one included."
    )
    days_since_training: float = 0.0


class Decision(BaseModel):
    """The policy's answer for one batch, with the signals it looked at."""

    policy: str
    retrain: bool
    reasons: list[str]
    signals: list[Signal] = Field(description="The signals this policy listens to.")
    could_not_judge: list[Signal] = Field(
        default_factory=list,
        description="When not empty, the policy could not fire on this batch: the signals it needs had no "
        "threshold (not calibrated, or nothing to measure), and why.",
    )

    def unjudged(self) -> str:
        """The signals it could not judge on, and why ('' when it could judge the batch)."""
        return "; ".join(f"{s.name}: {s.basis}" for s in self.could_not_judge)

    def blind_reason(self) -> str:
        """One line: why the policy could not judge the batch ('' when it could)."""
        return (
            f"policy {self.policy} could not judge this batch: {self.unjudged()}"
            if self.could_not_judge
            else ""
        )


def decide(policy: Policy, signals: dict[str, Signal], context: PolicyContext) -> Decision:
    """Apply a policy to a batch's signals."""
    if policy.name == "schedule":
        if policy.every_batches:
            due = context.batches_since_training >= policy.every_batches
            value: float = context.batches_since_training
            threshold: float | None = policy.every_batches
            unit = "batches"
        else:
            due, value = context.days_since_training >= (policy.every_days or 0), context.days_since_training
            threshold, unit = policy.every_days, "days"
        signals = {
            SCHEDULE: Signal(
                name=SCHEDULE,
                value=float(value),
                threshold=float(threshold or 0),
                fired=due,
                basis=f"{unit} since the champion was trained",
            )
        }
    heard = [signals[name] for name in LISTENS_TO[policy.name] if name in signals]
    fired = [s for s in heard if s.fired]
    if policy.name == "always":
        retrain, reasons = True, ["policy always: every batch retrains"]
    elif policy.name == "never":
        retrain, reasons = False, []
    elif policy.name == "drift-and-performance":
        drifted = [s for s in fired if s.name in (DATA_DRIFT, PREDICTION_DRIFT)]
        performance = [s for s in fired if s.name == PERFORMANCE]
        retrain = bool(drifted and performance)
        reasons = [s.line() for s in drifted + performance] if retrain else []
    else:
        retrain, reasons = bool(fired), [s.line() for s in fired]
    return Decision(
        policy=policy.text,
        retrain=retrain,
        reasons=reasons,
        signals=heard,
        could_not_judge=_unjudged(policy, heard),
    )


def _unjudged(policy: Policy, heard: list[Signal]) -> list[Signal]:
    """The signals that leave a policy unable to fire: for `drift-and-performance`, either half without
    a judged signal; for the others, every signal it listens to without a threshold (`never` and
    `always` listen to none, a schedule's signal always has one)."""
    if policy.name == "drift-and-performance":
        halves = [[s for s in heard if s.name == PERFORMANCE], [s for s in heard if s.name != PERFORMANCE]]
    else:
        halves = [heard]
    return [s for half in halves if half and all(s.threshold is None for s in half) for s in half]
