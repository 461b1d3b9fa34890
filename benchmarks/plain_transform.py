"""The plain script B13 compares batch scoring with: what a user writes without a framework.

    python -m benchmarks.plain_transform MODEL_URI DATA_FOLDER OUTPUT_FILE

pandas reads every Parquet file of the folder, `mlflow.pyfunc` predicts them in one call (LightGBM
on every core) and the key columns with the predictions go to one Parquet file.
"""

from __future__ import annotations

import sys


def main(model_uri: str, data: str, output: str) -> None:
    import mlflow
    import pandas as pd

    model = mlflow.pyfunc.load_model(model_uri)
    frame = pd.read_parquet(data)
    predicted = model.predict(frame)
    pd.concat([frame[["dteday", "hr"]], predicted], axis=1).to_parquet(output, index=False)


if __name__ == "__main__":
    main(*sys.argv[1:4])
