"""Pointing MLflow's fluent API (`mlflow.log_*`, `mlflow.pyfunc.load_model("models:/...")`) at a
store without changing the process's settings."""

from __future__ import annotations

from tasks.steps.environ import environment_restored

MLFLOW_URI_VARIABLES = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


def point_fluent_api(tracking_uri: str, registry_uri: str) -> None:
    """MLflow's setters also write `MLFLOW_TRACKING_URI` / `MLFLOW_REGISTRY_URI` into `os.environ`;
    left there, they read as the user's own settings in the next run of this process (a test
    session, a long-lived Dask worker) and in every child process, sending runs and registrations
    to another store. The fluent API keeps the URIs in module state, so the environment is put back
    as it was."""
    import mlflow

    with environment_restored(MLFLOW_URI_VARIABLES):
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(registry_uri)
