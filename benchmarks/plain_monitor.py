"""The plain script B16 and B17 compare `flows.monitor` with: what a user writes without a framework.

    python -m benchmarks.plain_monitor MODEL_URI TRAINING_ROWS BATCH REPORT_HTML

Loads the champion with `mlflow.pyfunc`, predicts the batch and the training rows, and writes
Evidently's DataDriftPreset report of the batch against the training rows (the model's input
columns and its prediction) as HTML. None of the monitor's other work: no data-quality check, no
calibrated thresholds, no performance, no history, no lineage, no event.
"""

from __future__ import annotations

import sys


def read(path: str):
    import pandas as pd

    return pd.read_csv(path) if path.endswith(".csv") else pd.read_parquet(path)  # a file or a folder


def main(model_uri: str, training_rows: str, batch_file: str, report_html: str) -> None:
    import mlflow
    from evidently import Report
    from evidently.presets import DataDriftPreset

    model = mlflow.pyfunc.load_model(model_uri)
    inputs = [c.name for c in model.metadata.get_input_schema().inputs]
    reference = read(training_rows)[inputs]
    batch = read(batch_file)[inputs]
    reference["prediction"] = model.predict(reference).iloc[:, 0].to_numpy()
    batch["prediction"] = model.predict(batch).iloc[:, 0].to_numpy()
    Report([DataDriftPreset()]).run(batch, reference).save_html(report_html)


if __name__ == "__main__":
    main(*sys.argv[1:5])
