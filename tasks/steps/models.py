"""Models handled for the author: one call logs a model to the running step's MLflow run.

`log_model(model)` logs a LightGBM booster or estimator, or a scikit-learn estimator (a Pipeline
too), with MLflow's flavour for it, and returns the `ModelRef` the next steps take. The model's pip
requirements are the versions installed here (which the lock file pinned), not MLflow's inference
(which loads the model again in a subprocess to see what it imports). The files' digests are
recorded as the model's manifest, so it loads only as it was logged (`tasks.steps.integrity`):
`load_model(ref)` in a later step gives the model back from a checked copy.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import logging
import os
import pickle
import warnings
from collections.abc import Iterator
from typing import Any, Literal

from tasks.steps.base import current_step
from tasks.steps.integrity import logged_model_id, record_manifest, verified_folder
from tasks.steps.refs import ModelRef
from tasks.steps.tags import MODEL_DIGEST_TAG

# MLflow's hint, at every signature with an integer column, that such a column cannot hold a gap.
MLFLOW_INTEGER_HINT = ".*Integer columns.*"
# MLflow's warning, at every model logged where pip is not installed (a uv environment), that the
# model's conda.yaml names pip without a version: true, and all the warning says.
MLFLOW_PIP_VERSION_WARNING = "Failed to resolve installed pip version"
# MLflow's switches for looking for a uv project in the working directory (to export requirements
# from it) and for copying its files into each model it logs.
MLFLOW_UV_AUTO_DETECT = "MLFLOW_UV_AUTO_DETECT"
MLFLOW_UV_FILES = "MLFLOW_LOG_UV_FILES"

Task = Literal["regression", "binary", "multiclass"]
BINARY = 2  # classes of a binary classifier
# What a model of each flavour needs to load and predict, beside MLflow itself.
REQUIREMENTS = {
    "lightgbm": ("lightgbm", "numpy", "pandas", "scikit-learn", "scipy"),
    "sklearn": ("scikit-learn", "numpy", "pandas", "scipy", "cloudpickle"),
}


@contextlib.contextmanager
def quiet_model_logging() -> Iterator[None]:
    """MLflow's model logging without two messages that are not news about the user's model: the
    integer-columns hint (`MLFLOW_INTEGER_HINT`; the tabular pipeline says it in one line of its own)
    and the pip-version warning (`MLFLOW_PIP_VERSION_WARNING`). Everything else MLflow says stays.

    Nor does MLflow copy the uv project it finds in the working directory (uv.lock and
    pyproject.toml, 0.8 MB here) into every model: that is the lock of whatever project the command
    ran in, not the model's environment, which its pinned requirements.txt states (so MLflow need not
    look for a uv project at all, and does not log that it found one). Set `MLFLOW_LOG_UV_FILES=true`
    or `MLFLOW_UV_AUTO_DETECT=true` to have them copied all the same."""
    if MLFLOW_UV_FILES not in os.environ:  # for the process: threads log models side by side
        os.environ.setdefault(MLFLOW_UV_AUTO_DETECT, "false")
    environment_log = logging.getLogger("mlflow.utils.environment")
    if _drop_pip_version_warning not in environment_log.filters:  # once per process, for every thread
        environment_log.addFilter(_drop_pip_version_warning)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=MLFLOW_INTEGER_HINT)
        yield


def _drop_pip_version_warning(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(MLFLOW_PIP_VERSION_WARNING)


def pinned_requirements(distributions: tuple[str, ...]) -> list[str]:
    """`name==version` for each installed distribution (MLflow's own first)."""
    pins = []
    for name in ("mlflow", *distributions):
        try:
            pins.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return pins


def flavour_of(model: Any) -> str:
    """`lightgbm` for LightGBM's booster and estimators, `sklearn` for other scikit-learn estimators."""
    module = type(model).__module__.split(".")[0]
    if module == "lightgbm":
        return "lightgbm"
    if hasattr(model, "fit") and hasattr(model, "predict") and hasattr(model, "get_params"):
        return "sklearn"
    raise TypeError(
        f"log_model logs LightGBM and scikit-learn models; got {type(model).__module__}.{type(model).__name__}. "
        "For anything else, log it with MLflow's own flavour in the step's run (current_step().run_id) "
        "and return a ModelRef."
    )


def task_of(model: Any) -> Task:
    """What the model predicts: from its classes (scikit-learn API) or its objective (a booster)."""
    classes = getattr(model, "classes_", None)
    if classes is not None:
        return "binary" if len(classes) == BINARY else "multiclass"
    objective = str(getattr(model, "params", {}).get("objective", ""))
    if objective.startswith(("binary", "cross_entropy")):
        return "binary"
    if objective.startswith(("multiclass", "softmax", "multiclassova")):
        return "multiclass"
    return "regression"


def skops_form(model: Any) -> tuple[bytes, list[str]]:
    """A scikit-learn model as skops (MLflow's format for it) writes it, and the types in it that skops
    does not trust by default. This process made the model, so they are trusted for it; what stops
    a changed file from being loaded later is the manifest of digests, not skops."""
    import skops.io

    data = skops.io.dumps(model)
    return data, list(skops.io.get_untrusted_types(data=data))


def model_digest(model: Any, serialized: bytes | None = None) -> str:
    """What a model is: its trees for LightGBM, else its serialized bytes. A cached training step hands
    on the same reference, so registration finds the version that holds it already."""
    booster = getattr(model, "booster_", model)
    if hasattr(booster, "model_to_string"):
        return hashlib.sha256(booster.model_to_string().encode()).hexdigest()
    return hashlib.sha256(serialized if serialized is not None else pickle.dumps(model)).hexdigest()


def log_model(
    model: Any,
    *,
    name: str = "model",
    input_example: Any = None,
    task: Task | None = None,
    extra_requirements: tuple[str, ...] = (),
) -> ModelRef:
    """Log `model` to the running step's MLflow run (as a logged model named `name`) and return its
    reference. `input_example` (a few rows of what `predict` takes) gives the model its signature;
    `task` is inferred from the model when not given."""
    import mlflow

    flavour = flavour_of(model)
    step = current_step()
    requirements = [*pinned_requirements(REQUIREMENTS[flavour]), *extra_requirements]
    options: dict[str, Any] = {
        "name": name,
        "input_example": input_example,
        "pip_requirements": requirements,
    }
    serialized = None
    with mlflow.start_run(run_id=step.run_id, nested=True), quiet_model_logging():
        if flavour == "lightgbm":
            info = mlflow.lightgbm.log_model(model, **options)
        else:
            serialized, trusted = skops_form(model)
            info = mlflow.sklearn.log_model(model, skops_trusted_types=trusted, **options)
    record_manifest(info.model_id, info.model_uri)
    digest = model_digest(model, serialized)
    step.set_tags({MODEL_DIGEST_TAG: digest})
    return ModelRef(
        uri=info.model_uri,
        run_id=step.run_id,
        model_id=info.model_id,
        task=task or task_of(model),
        digest=digest,
    )


def load_model(model: ModelRef) -> Any:
    """The model `log_model` logged, as its library's own object (a LightGBM Booster, a scikit-learn
    estimator), read from a private copy whose files match the manifest recorded at logging; a new
    object on each call, the copy made once per process. (`mlflow.sklearn.load_model(model.uri)`
    skips the check and, from a tracking server, leaves a new copy in the temporary directory on
    every call.)"""
    import mlflow

    copy = verified_folder(
        model.model_id or logged_model_id(model.uri), mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    )
    flavors = mlflow.models.Model.load(str(copy / "MLmodel")).flavors
    if "lightgbm" in flavors:
        return mlflow.lightgbm.load_model(str(copy))
    if "sklearn" in flavors:
        return mlflow.sklearn.load_model(str(copy))
    raise ValueError(
        f"{model.uri} is a model of the flavours {sorted(flavors)}: load_model loads what log_model logs "
        "(LightGBM, scikit-learn); load others with mlflow.pyfunc"
    )
