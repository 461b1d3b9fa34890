"""The tuning step's schedule: parallel trials, yet the same trials as a seeded sequential search."""

from __future__ import annotations

import random
import threading
import time

import optuna
import pytest
from distributed import LocalCluster
from prefect import flow

from tasks.steps import ParamRange, TuningResult, TuningSpec, lineage, run_trials, tuning_step
from tasks.steps.compute import dask_cluster
from tasks.steps.settings import get_settings
from tasks.steps.tuning import STARTUP_TRIALS, optuna_distributions

pytestmark = pytest.mark.usefixtures("prefect_harness", "state")

SPACE = {"x": ParamRange(low=-2.0, high=2.0), "n": ParamRange(low=1, high=50, integer=True)}
RUNNING = {"now": 0, "most": 0}
LOCK = threading.Lock()


def objective(params: dict) -> float:
    return (params["x"] - 0.7) ** 2 + abs(params["n"] - 20) / 50


def trial(params: dict) -> dict:
    """Runs on an in-process Dask worker thread; takes a random time, so trials finish out of order."""
    with LOCK:
        RUNNING["now"] += 1
        RUNNING["most"] = max(RUNNING["most"], RUNNING["now"])
    time.sleep(random.uniform(0.2, 0.4))
    with LOCK:
        RUNNING["now"] -= 1
    return {"loss": objective(params)}


@tuning_step(name="tune-toy")
def tune_toy(spec: TuningSpec) -> TuningResult:
    return run_trials(spec, trial)


@flow(name="toy-tuning")
def toy_tuning(spec: TuningSpec) -> TuningResult:
    settings = get_settings()
    with lineage.pipeline_run("toy-tuning", {}, settings), dask_cluster(settings):
        return tune_toy(spec)


@pytest.fixture(scope="module")
def threads_cluster():
    """Four worker threads in this process: more room than the trials may take at once."""
    with LocalCluster(n_workers=4, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        yield cluster.scheduler_address


def tune(address: str, monkeypatch, parallel: int, **spec) -> TuningResult:
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", address)
    RUNNING.update(now=0, most=0)
    tuning = TuningSpec(space=SPACE, n_trials=18, parallel=parallel, objective="loss", seed=7, **spec)
    return toy_tuning(tuning)


def scheduled_optuna(n_trials: int, seed: int, parallel: int) -> list[dict]:
    """The schedule worked by hand, no workers: after the start-up trials, trial n is asked once
    trials 0 .. n - parallel are told. With parallel=1 this is a plain script's ask-evaluate-tell."""
    study = optuna.create_study(
        sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=STARTUP_TRIALS)
    )
    asked: list = []
    told = 0
    for n in range(n_trials):
        while n >= STARTUP_TRIALS and told <= n - parallel:
            study.tell(asked[told], objective(asked[told].params))
            told += 1
        asked.append(study.ask(optuna_distributions(SPACE)))
    return [t.params for t in asked]


def test_parallel_trials_are_the_same_whatever_order_they_finish_in(threads_cluster, monkeypatch):
    first = tune(threads_cluster, monkeypatch, parallel=3)
    assert RUNNING["most"] == 3  # never more than asked for, though 4 worker threads are free
    second = tune(threads_cluster, monkeypatch, parallel=3)
    assert [t.params for t in first.trials] == scheduled_optuna(18, seed=7, parallel=3)
    assert [t.params for t in first.trials] == [t.params for t in second.trials]
    assert first.best_params == second.best_params and first.best_trial == second.best_trial


def test_one_trial_at_a_time_is_plain_sequential_optuna(threads_cluster, monkeypatch):
    result = tune(threads_cluster, monkeypatch, parallel=1)
    assert RUNNING["most"] == 1
    assert [t.params for t in result.trials] == scheduled_optuna(18, seed=7, parallel=1)


def test_random_strategy_tries_the_same_trials_at_any_parallelism(threads_cluster, monkeypatch):
    one = tune(threads_cluster, monkeypatch, parallel=1, strategy="random")
    three = tune(threads_cluster, monkeypatch, parallel=3, strategy="random")
    assert [t.params for t in one.trials] == [t.params for t in three.trials]
