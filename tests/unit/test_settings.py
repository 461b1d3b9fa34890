"""Settings are read when asked for, honour the ecosystem's variables, and are not polluted by MLflow."""

from __future__ import annotations

import os

from tasks.steps import lineage
from tasks.steps.settings import get_settings


def test_embedded_defaults_live_under_the_state_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("KEEL_STATE_DIR", str(tmp_path))
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "DASK_SCHEDULER_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    settings = get_settings()
    assert settings.tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert settings.registry_uri == settings.tracking_uri
    assert settings.artifact_location == (tmp_path / "mlartifacts").as_uri()
    assert settings.datasets_root == str(tmp_path / "datasets")
    assert settings.dask_scheduler_address is None


def test_ecosystem_variables_switch_to_servers(tmp_path, monkeypatch):
    monkeypatch.setenv("KEEL_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", "tcp://127.0.0.1:8786")
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    settings = get_settings()
    assert settings.tracking_uri == settings.registry_uri == "http://127.0.0.1:5000"
    assert settings.artifact_location is None  # the server decides
    assert settings.dask_scheduler_address == "tcp://127.0.0.1:8786"


def test_pointing_mlflow_at_a_store_leaves_the_users_environment_alone(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("KEEL_STATE_DIR", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    lineage.mlflow_client(get_settings())
    assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_REGISTRY_URI" not in os.environ
    assert mlflow.get_tracking_uri() == get_settings().tracking_uri
    assert get_settings().tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
