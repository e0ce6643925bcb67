"""MLflow pyfunc wrapper (logged as "model from code": MLflow runs this file, no pickle).

`mlflow.pyfunc.load_model("runs:/<id>/model").predict(pd.DataFrame({"path": [...]}))` returns one row per photo
with the probability of each HS code (columns = codes).
"""
from pathlib import Path

import mlflow
from mlflow.models import set_model


class HSFlowPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from hsflow.models.package import HSModel

        self.model = HSModel.load(Path(context.artifacts["meta"]).parent)

    def predict(self, context, model_input, params=None):
        import pandas as pd
        import torch

        from hsflow.images import open_rgb

        paths = list(model_input["path"]) if hasattr(model_input, "columns") else list(model_input)
        pre = self.model.preprocess()
        x = torch.stack([pre(open_rgb(p)) for p in paths])
        return pd.DataFrame(self.model.probabilities(x).numpy(), columns=self.model.classes)


set_model(HSFlowPyfunc())
