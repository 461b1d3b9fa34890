"""One settings object, read from the environment when asked for, never at import.

The ecosystem's own variables win (`MLFLOW_TRACKING_URI`, `DASK_SCHEDULER_ADDRESS`,
`MLFLOW_EXPERIMENT_NAME`); project variables carry the `KEEL_` prefix. With nothing set, everything
runs embedded under one state directory: an MLflow SQLite store and artifact folder, and a Dask
LocalCluster started for the run. Prefect reads `PREFECT_API_URL` itself: unset, flows run without
a server.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from tasks.steps.access import DEFAULT_SCHEMES, DataAccess


class Settings(BaseSettings):
    """Where state lives and which servers to use."""

    model_config = SettingsConfigDict(env_prefix="KEEL_", extra="ignore", frozen=True)

    state_dir: Path = Field(
        default=Path(".keel"),
        description="Folder for everything the embedded mode writes (MLflow store, artifacts, datasets).",
    )
    mlflow_tracking_uri: str | None = Field(
        default=None,
        validation_alias=AliasChoices("MLFLOW_TRACKING_URI", "KEEL_MLFLOW_TRACKING_URI"),
        description="MLflow tracking server or store; unset: SQLite under the state directory.",
    )
    mlflow_registry_uri: str | None = Field(
        default=None,
        validation_alias=AliasChoices("MLFLOW_REGISTRY_URI", "KEEL_MLFLOW_REGISTRY_URI"),
        description="MLflow model registry; unset: the tracking URI.",
    )
    experiment_name: str = Field(
        default="keel",
        validation_alias=AliasChoices("MLFLOW_EXPERIMENT_NAME", "KEEL_EXPERIMENT_NAME"),
        description="MLflow experiment that pipeline executions are recorded in.",
    )
    dask_scheduler_address: str | None = Field(
        default=None,
        validation_alias=AliasChoices("DASK_SCHEDULER_ADDRESS", "KEEL_DASK_SCHEDULER_ADDRESS"),
        description="Dask scheduler to connect to; unset: a LocalCluster is started for the run.",
    )
    dask_local_workers: int = Field(default=2, ge=1, le=64, description="Workers of the LocalCluster.")
    dask_threads_per_worker: int = Field(default=1, ge=1, le=64, description="Threads per local worker.")
    dask_worker_memory: str = Field(
        default="4GiB", description="Memory limit per local worker (Dask spills and pauses past it)."
    )
    dask_in_process_below: str = Field(
        default="16MiB",
        description="A run without a scheduler whose input data is smaller than this runs its Dask work "
        "on threads of its own process (no worker processes to start); 0: never.",
    )
    warm_pool: str | None = Field(
        default=None,
        description="Keep Prefect's server and a Dask cluster running for this long after a run (e.g. 10m) "
        "and use them for the next runs (infra/pool.py); unset: each run starts and stops its own.",
    )
    data_dir: str | None = Field(
        default=None,
        description="Where processing steps write their outputs (a path or fsspec URL the workers can "
        "reach); unset: `<state_dir>/datasets`.",
    )

    data_roots: str | None = Field(
        default=None,
        description="Folders or URL prefixes input data may come from, separated by commas; unset: anywhere.",
    )
    data_schemes: str = Field(
        default=",".join(DEFAULT_SCHEMES),
        description="URL schemes input data may be read with, separated by commas (e.g. file,s3).",
    )

    @field_validator("dask_in_process_below")
    @classmethod
    def _a_size(cls, value: str) -> str:
        from dask.utils import parse_bytes

        if parse_bytes(value) < 0:
            raise ValueError("a size, e.g. 16MiB, or 0")
        return value

    @field_validator("warm_pool")
    @classmethod
    def _a_duration(cls, value: str | None) -> str | None:
        from infra.pool import idle_seconds  # the pool reads the same form

        if not value:
            return None  # KEEL_WARM_POOL= (empty): no pool, as unset
        try:
            idle_seconds(value)
        except ValueError:
            raise ValueError("a duration such as 10m, 90s or 1h") from None
        return value.strip()

    @property
    def in_process_below_bytes(self) -> int:
        from dask.utils import parse_bytes

        return int(parse_bytes(self.dask_in_process_below))

    @property
    def data_access(self) -> DataAccess:
        """The data-access policy every flow applies to its inputs (`tasks.steps.access`)."""
        return DataAccess.parse(self.data_roots, self.data_schemes)

    @property
    def rejected_dir(self) -> Path:
        """Where the reasons for refused inputs are written (one JSON file per execution)."""
        return (self.state_dir / "rejected").resolve()

    @property
    def mlflow_database(self) -> Path:
        """The embedded MLflow store's SQLite file (used when no tracking URI is set)."""
        return (self.state_dir / "mlflow.db").resolve()

    @property
    def tracking_uri(self) -> str:
        if self.mlflow_tracking_uri:
            return self.mlflow_tracking_uri
        return f"sqlite:///{self.mlflow_database}"

    @property
    def registry_uri(self) -> str:
        return self.mlflow_registry_uri or self.tracking_uri

    @property
    def embedded_mlflow(self) -> bool:
        return not self.mlflow_tracking_uri

    @property
    def artifact_location(self) -> str | None:
        """Artifact root for new experiments in embedded mode; a server decides its own."""
        if not self.embedded_mlflow:
            return None
        return (self.state_dir / "mlartifacts").resolve().as_uri()

    @property
    def datasets_root(self) -> str:
        return self.data_dir or str((self.state_dir / "datasets").resolve())

    @property
    def prefect_api_url(self) -> str | None:
        return os.environ.get("PREFECT_API_URL") or None


def get_settings() -> Settings:
    """Read the settings now (cheap; call it where they are needed, not at import)."""
    settings = Settings()
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    return settings
