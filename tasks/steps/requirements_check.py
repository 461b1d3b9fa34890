"""MLflow's check of a model's requirements against this environment, without its scan of every package.

Logging a model and loading one, MLflow checks each of the model's requirements (`lightgbm==4.6.0`)
against what is installed, and warns of a mismatch. Before its first check in a process it maps
every installed distribution to the modules it provides (`importlib_metadata.packages_distributions`,
which reads the file list of each of the 100-odd distributions here that ship no `top_level.txt`):
0.3-0.4 s alone, 0.5-0.6 s inside a run, on the critical path of the training step of every cold
run and of the first model a monitoring run loads. The map only serves requirements whose
distribution cannot be found by name. `check_requirements_quickly` puts a filter in front of the
check: a requirement that names a distribution installed here at a version it allows is satisfied
and needs no further look; every other one (a mismatch, a distribution not found by name, a URL,
extras, a marker) goes to MLflow's own check, which says what it would have said. So the warnings
are MLflow's, word for word, and the scan only runs when one of them can follow.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
from collections.abc import Callable

# The modules that take MLflow's check by name (imported from `mlflow.utils.requirements_utils`).
CHECKING_MODULES = ("mlflow.utils.environment", "mlflow.pyfunc")
CHECK = "warn_dependency_requirement_mismatches"


def check_requirements_quickly() -> None:
    """From now on in this process, requirements this environment satisfies by name skip MLflow's
    check (module docstring). Idempotent; a module that no longer has the check is left alone."""
    for name in CHECKING_MODULES:
        module = importlib.import_module(name)
        check = getattr(module, CHECK, None)
        if check is not None and not getattr(check, "skips_satisfied", False):
            setattr(module, CHECK, skipping_satisfied(check))


def skipping_satisfied(check: Callable[[list[str]], None]) -> Callable[[list[str]], None]:
    """`check` (MLflow's), given only the requirements `satisfied_by_name` cannot vouch for."""

    @functools.wraps(check)
    def checked(model_requirements: list[str]) -> None:
        check([r for r in model_requirements if not satisfied_by_name(r)])

    checked.skips_satisfied = True  # type: ignore[attr-defined]
    return checked


def satisfied_by_name(requirement: str) -> bool:
    """True if `requirement` is a plain `name<versions>` and the distribution of that name installed
    here has a version it allows (MLflow's own version for `mlflow`, as MLflow checks it)."""
    from packaging.requirements import InvalidRequirement, Requirement

    try:
        parsed = Requirement(requirement)
    except InvalidRequirement:
        return False
    if parsed.url or parsed.extras or parsed.marker:
        return False
    installed = installed_version(parsed.name)
    return installed is not None and parsed.specifier.contains(installed)  # as MLflow asks


def installed_version(distribution: str) -> str | None:
    if distribution.lower() == "mlflow":
        import mlflow

        return mlflow.__version__
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
