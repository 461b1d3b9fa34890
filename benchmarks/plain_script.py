"""The pipeline's modelling work as a plain script: pandas + Optuna + LightGBM, no orchestration.

    .venv/bin/python -m benchmarks.plain_script [--data PATH] [--start DAY] [--drop-columns ...]

What a competent user would write by hand, doing the same modelling work as `python -m flows.pipeline`
with the same flags: the same table and data window, the same time split, the same features (the
same `model_matrix`), the same search space, seed, trial count, trees and early stopping, the final
fit on train + validation with the best trial's trees, and the test metrics. Trials run one after
another with LightGBM's default threads (every core), and each builds its `lgb.Dataset` and scores
a prediction of the validation split, as Optuna's own LightGBM example does; the pipeline bins
once per worker and takes the validation metrics from LightGBM's evaluation (the same trials and
trees either way). It does none of the pipeline's other work: no data-quality check, no baseline
profile, no lineage, no registry.
Prints the wall time and the test metrics as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import date
from pathlib import Path

import lightgbm as lgb
import numpy as np
import optuna
import pandas as pd

from flows.pipeline import PipelineParams
from tasks.steps.tuning import optuna_distributions
from tasks.tabular.featurize import TIME_PARTS, FeatureSpec, encode_target, model_matrix, parse_time
from tasks.tabular.modeling import booster_params, score


def read(path: str) -> pd.DataFrame:
    source = Path(path)
    if source.suffix == ".csv":
        return pd.read_csv(source)
    return pd.read_parquet(source)  # a file or a folder of Parquet files


def main(params: PipelineParams) -> dict[str, float]:
    started = time.perf_counter()
    frame = read(params.data).drop(columns=params.drop_columns)
    frame[params.time_column] = parse_time(frame[params.time_column])
    if params.split.start:
        frame = frame[frame[params.time_column] >= pd.Timestamp(params.split.start)]
    frame = frame[frame[params.target].notna()]
    t = frame[params.time_column]
    span = t.max() - t.min()
    valid_start = t.min() + span * (1 - params.split.valid_fraction - params.split.test_fraction)
    test_start = t.min() + span * (1 - params.split.test_fraction)
    parts = {
        "train": frame[t < valid_start],
        "valid": frame[(t >= valid_start) & (t < test_start)],
        "test": frame[t >= test_start],
    }
    hour_varies = bool((parts["train"][params.time_column].dt.hour != 0).any())
    spec = FeatureSpec(
        target=params.target,
        time_column=params.time_column,
        task="regression",
        numeric=[c for c in frame.columns if c not in (params.target, params.time_column)],
        categorical={},
        time_parts=[p for p in TIME_PARTS if p != "hour" or hour_varies],
    )
    xs = {
        name: (model_matrix(part, spec), encode_target(part[params.target], spec))
        for name, part in parts.items()
    }

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        direction="minimize", sampler=optuna.samplers.TPESampler(seed=params.training.seed)
    )
    distributions = optuna_distributions(params.tuning.space)
    best_iteration, trials = {}, []
    for _ in range(params.tuning.n_trials):
        trial = study.ask(distributions)
        booster = lgb.train(
            booster_params(spec, trial.params, params.training.seed, threads=0),
            lgb.Dataset(*xs["train"]),
            num_boost_round=params.training.num_boost_round,
            valid_sets=[lgb.Dataset(*xs["valid"])],
            callbacks=[lgb.early_stopping(params.training.early_stopping_rounds, verbose=False)],
        )
        predicted = booster.predict(xs["valid"][0], num_iteration=booster.best_iteration)
        best_iteration[trial.number] = booster.best_iteration
        trials.append(trial.params)
        study.tell(trial, score("regression", xs["valid"][1], predicted)["rmse"])
    x = pd.concat([xs["train"][0], xs["valid"][0]], ignore_index=True)
    y = np.concatenate([xs["train"][1], xs["valid"][1]])
    final = lgb.train(
        booster_params(spec, study.best_params, params.training.seed, threads=0),
        lgb.Dataset(x, y),
        num_boost_round=best_iteration[study.best_trial.number],
    )
    metrics = score("regression", xs["test"][1], final.predict(xs["test"][0]))
    return {
        "seconds_after_imports": time.perf_counter() - started,
        "best_trial": study.best_trial.number,
        "trials": trials,
        **metrics,
    }


def parse(argv: list[str]) -> PipelineParams:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default=PipelineParams().data)
    parser.add_argument("--start", type=date.fromisoformat, default=None)
    parser.add_argument("--drop-columns", nargs="*", default=None)
    parser.add_argument("--target", default=None)
    parser.add_argument("--time-column", default=None)
    parser.add_argument("--key-columns", nargs="*", default=None)
    args = parser.parse_args(argv)
    given = {k: v for k, v in vars(args).items() if v is not None}
    return PipelineParams(**given)


if __name__ == "__main__":
    json.dump(main(parse(sys.argv[1:])), sys.stdout)
