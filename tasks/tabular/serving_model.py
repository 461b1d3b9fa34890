"""The served model, logged with MLflow's "models from code": nothing in it is pickled.

The model directory holds LightGBM's own text model file and the feature spec as JSON; this file
is the code that loads them. `mlflow.pyfunc.load_model(...).predict(raw_rows)` builds the same
features as training did and returns a frame with `prediction` (and `probability_<label>` columns
for classifiers).
"""

from __future__ import annotations

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

try:
    from tasks.tabular.featurize import FeatureSpec, model_matrix, predictions_frame
except ImportError:  # loaded outside the project: MLflow put featurize.py on sys.path
    from featurize import FeatureSpec, model_matrix, predictions_frame  # type: ignore[no-redef]


class LightGBMTableModel(PythonModel):
    """A LightGBM booster plus the feature spec it was trained with."""

    def load_context(self, context) -> None:
        import lightgbm as lgb

        self.booster = lgb.Booster(model_file=context.artifacts["booster"])
        with open(context.artifacts["feature_spec"], encoding="utf-8") as handle:
            self.spec = FeatureSpec.model_validate_json(handle.read())

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        return predictions_frame(self.booster.predict(model_matrix(model_input, self.spec)), self.spec)


mlflow.models.set_model(LightGBMTableModel())
