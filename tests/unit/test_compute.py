"""Where a run's Dask work goes: small input in the run's own process, larger input or a named
scheduler on worker processes (real Dask clusters, no mocks)."""

from __future__ import annotations

import os

import pytest
from pydantic import ValidationError

from tasks.steps.compute import dask_client, dask_cluster, local_size, runs_in_process
from tasks.steps.settings import Settings


def _pid() -> int:
    return os.getpid()


def _profiles(dask_worker) -> bool:
    return "profile" in dask_worker.periodic_callbacks


def test_local_size_counts_files_and_folders_and_knows_nothing_of_urls(tmp_path):
    (tmp_path / "a.csv").write_bytes(b"x" * 100)
    (tmp_path / "parts").mkdir()
    (tmp_path / "parts" / "p1.parquet").write_bytes(b"y" * 50)
    (tmp_path / "parts" / "p2.parquet").write_bytes(b"z" * 25)
    assert local_size([str(tmp_path / "a.csv")]) == 100
    assert local_size([str(tmp_path / "a.csv"), str(tmp_path / "parts")]) == 175
    assert local_size(["s3://bucket/data.parquet"]) is None
    assert local_size([str(tmp_path / "missing.csv")]) is None
    assert local_size([None]) is None


def test_the_threshold_and_a_named_scheduler_decide(monkeypatch):
    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    settings = Settings(dask_in_process_below="1KiB")
    assert runs_in_process(settings, 1023)
    assert not runs_in_process(settings, 1024)
    assert not runs_in_process(settings, None)  # unknown size: worker processes
    assert not runs_in_process(Settings(dask_in_process_below="0"), 0)  # 0: never
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", "tcp://127.0.0.1:8786")
    assert not runs_in_process(Settings(dask_in_process_below="1GiB"), 10)


def test_bad_sizes_are_refused():
    with pytest.raises(ValidationError):
        Settings(dask_in_process_below="a lot")
    with pytest.raises(ValidationError):
        Settings(warm_pool="ten minutes")
    assert Settings(warm_pool=" 10m ").warm_pool == "10m"


@pytest.mark.slow
def test_small_input_runs_in_this_process_and_larger_on_worker_processes(monkeypatch):
    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    settings = Settings(dask_in_process_below="1MiB")
    with dask_cluster(settings, 10):
        client = dask_client()
        assert all(a.startswith("inproc://") for a in client.scheduler_info()["workers"])
        assert client.submit(_pid, pure=False).result() == os.getpid()
        threads = sum(w["nthreads"] for w in client.scheduler_info()["workers"].values())
        assert threads == settings.dask_local_workers * settings.dask_threads_per_worker
        # No self-profiling in the run's process (its sys._current_frames() could deadlock on 3.11 < 3.11.9).
        assert client.run(_profiles) == {address: False for address in client.scheduler_info()["workers"]}
    with dask_cluster(settings, 2**20):
        client = dask_client()
        assert all(a.startswith("tcp://127.0.0.1:") for a in client.scheduler_info()["workers"])
        assert client.submit(_pid, pure=False).result() != os.getpid()


def test_a_pipeline_preloads_its_steps_modules_only_when_its_dask_work_stays_here(tmp_path, monkeypatch):
    from tests.pool_pipeline import PRELOADED, PoolParams, pool_pipeline

    monkeypatch.setenv("KEEL_STATE_DIR", str(tmp_path / ".keel"))
    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    data = tmp_path / "data.csv"
    data.write_bytes(b"x" * 2048)
    params = PoolParams(data=str(data))
    monkeypatch.setenv("KEEL_DASK_IN_PROCESS_BELOW", "1MiB")
    assert pool_pipeline.preload(params) == (PRELOADED,)
    monkeypatch.setenv("KEEL_DASK_IN_PROCESS_BELOW", "1KiB")  # worker processes import it themselves
    assert pool_pipeline.preload(params) == ()
    monkeypatch.setenv("KEEL_DASK_IN_PROCESS_BELOW", "1MiB")
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", "tcp://127.0.0.1:8786")
    assert pool_pipeline.preload(params) == ()
