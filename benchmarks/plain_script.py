"""The demo's work done as a plain script: pandas + Optuna + LightGBM, no orchestration, no lineage.

Same data, features (the same `model_matrix`), time split, search space, seed, trial count, trees
and early stopping as `python -m flows.pipeline` with its defaults; trials run one after another,
as a script would run them.
"""

from __future__ import annotations

import json
import sys
import time

import lightgbm as lgb
import numpy as np
import optuna
import pandas as pd

from flows.pipeline import PipelineParams
from tasks.featurize import TIME_PARTS, FeatureSpec, encode_target, model_matrix, parse_time
from tasks.modeling import booster_params, score
from tasks.steps.tuning import optuna_distributions


def main() -> dict[str, float]:
    started = time.perf_counter()
    params = PipelineParams()
    frame = pd.read_csv(params.data).drop(columns=params.drop_columns)
    frame[params.time_column] = parse_time(frame[params.time_column])
    frame = frame[frame[params.target].notna()]
    t = frame[params.time_column]
    span = t.max() - t.min()
    valid_start = t.min() + span * (1 - params.valid_fraction - params.test_fraction)
    test_start = t.min() + span * (1 - params.test_fraction)
    train, valid, test = (
        frame[t < valid_start],
        frame[(t >= valid_start) & (t < test_start)],
        frame[t >= test_start],
    )
    numeric = [c for c in frame.columns if c not in (params.target, params.time_column)]
    spec = FeatureSpec(
        target=params.target,
        time_column=params.time_column,
        task="regression",
        numeric=numeric,
        categorical={},
        time_parts=[p for p in TIME_PARTS if p != "hour"],
    )
    xs = {
        name: (model_matrix(part, spec), encode_target(part[params.target], spec))
        for name, part in (("train", train), ("valid", valid), ("test", test))
    }

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=params.seed))
    distributions = optuna_distributions(params.space)
    best_iteration = {}
    for _ in range(params.n_trials):
        trial = study.ask(distributions)
        booster = lgb.train(
            booster_params(spec, trial.params, params.seed, threads=1),
            lgb.Dataset(*xs["train"]),
            num_boost_round=params.num_boost_round,
            valid_sets=[lgb.Dataset(*xs["valid"])],
            callbacks=[lgb.early_stopping(params.early_stopping_rounds, verbose=False)],
        )
        predicted = booster.predict(xs["valid"][0], num_iteration=booster.best_iteration)
        rmse = float(np.sqrt(np.mean((xs["valid"][1] - predicted) ** 2)))
        best_iteration[trial.number] = booster.best_iteration
        study.tell(trial, rmse)
    x = pd.concat([xs["train"][0], xs["valid"][0]], ignore_index=True)
    y = np.concatenate([xs["train"][1], xs["valid"][1]])
    final = lgb.train(
        booster_params(spec, study.best_params, params.seed, threads=0),
        lgb.Dataset(x, y),
        num_boost_round=best_iteration[study.best_trial.number],
    )
    metrics = score("regression", xs["test"][1], final.predict(xs["test"][0]))
    return {"seconds": time.perf_counter() - started, **metrics}


if __name__ == "__main__":
    json.dump(main(), sys.stdout)
