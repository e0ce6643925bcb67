"""MLflow pyfunc wrapper (logged as "model from code": MLflow runs this file, no pickle).

`mlflow.pyfunc.load_model("runs:/<id>/model").predict(pd.DataFrame({"path": [...]}))` returns one row per photo
with the probability of each HS code (columns = codes), then `unknown` (bool) and `unknown_score`: the photos go
through hsflow.recommend's own per-photo path (same decoding, same unknown decision as the command).
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

        from hsflow import recommend

        paths = list(model_input["path"]) if hasattr(model_input, "columns") else list(model_input)
        rows, unknown, scores = [], [], []
        for _, probs, error, score in recommend.predict(self.model, [Path(p) for p in paths], num_workers=0,
                                                        progress=False):
            if error:
                raise ValueError(error)
            rows.append(probs.tolist())
            scores.append(score)
            unknown.append(recommend.is_unknown(self.model, score))
        out = pd.DataFrame(rows, columns=self.model.classes)
        out["unknown"], out["unknown_score"] = unknown, scores
        return out


set_model(HSFlowPyfunc())
