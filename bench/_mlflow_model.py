"""The MLflow side of ``bench/serving.py``: a pyfunc (models from code) that does what the model server does.

It takes the raw penguin columns (``dataframe_records``), applies the fitted ``FeatureTransform`` from the
``build_features`` step, runs the trained network (eager torch, one thread) and returns one row per record: the
predicted label and the class probabilities. ``bench/serving.py`` logs it with two artifacts:
``feature_spec`` (the ``feature_spec.json`` file) and ``model_dir`` (the ``train`` output folder).
"""

from __future__ import annotations

from typing import Any

import mlflow
import pandas as pd
import torch
from mlflow.pyfunc import PythonModel

from kiln.tasks.features.transform import FeatureTransform
from kiln.tasks.training.networks import LoadedModel, load_model, predict


class RawRecordsModel(PythonModel):
    """Raw records in, ``label`` + ``p_<class>`` columns out."""

    transform: FeatureTransform
    model: LoadedModel

    def load_context(self, context: Any) -> None:
        torch.set_num_threads(1)
        self.transform = FeatureTransform.load(context.artifacts["feature_spec"])
        self.model = load_model(context.artifacts["model_dir"])

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        probs = predict(self.model, self.transform.transform(model_input))
        out = pd.DataFrame(probs, columns=[f"p_{c}" for c in self.transform.classes or ()])
        out.insert(0, "label", self.transform.decode_target(probs.argmax(1)))
        return out


mlflow.models.set_model(RawRecordsModel())
