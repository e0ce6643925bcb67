"""MLflow pyfunc wrapper (logged as "model from code": MLflow runs this file, no pickle).

One row per photo, columns (all optional, one of `image`/`path` per row):
  image  the photo file's bytes (binary; base64 in a JSON request to `mlflow models serve`)
  path   a photo file on this machine (in-process use; refused by the scoring server unless its model config
         says `read_paths: true`, so a REST client cannot probe the server's disk)
  name   what the answer calls an `image` photo (default: "row <n>"; a `path` row is called by its path)
  item   rows sharing an item are one recommendation from the mean of their probabilities (several photos of
         one product, like `hsflow.recommend --group-by folder`)
  members  (with `item`, instead of a photo) the JSON list of an item's photos as result "parts" gave them: the row
         is answered for the item, as `hsflow.recommend --group-by` answers a folder (hsflow.score --group-by folder
         groups in Spark after scoring, one row a photo, and sends each group back through the model)
Params: top_k (default 5), precedents (default: the model's own setting), result (default "records"), group_key
(what a group answer calls its item: "item" or "folder").

result "records": a list with, per photo (or item), exactly the JSON object `hsflow.recommend --format json`
prints: the same function (`hsflow.recommend.iter_recommend`) makes both. result "json" (the logged output schema,
what `mlflow.pyfunc.spark_udf(..., params={"result": "json"})` needs): a DataFrame with one string column `answer`,
that object as the CLI's JSON line, exactly one row out per row in (`item` is ignored: group after scoring, as
hsflow.score does in Spark). result "parts": one string a photo, what its group's answer needs (probabilities,
embedding, unknown score; hsflow.serving.recommend.iter_parts). A photo that cannot be used gets its `error` entry;
the rest of the batch is answered.
"""
import base64
import binascii
import os
import warnings
from pathlib import Path

import mlflow
from mlflow.models import set_model

# The signature is given explicitly at logging: predict type hints would make MLflow's scoring server skip its
# base64 decoding of the binary column, so MLflow's advice to add them is not followed (nor printed).
warnings.filterwarnings("ignore", message=".*Add type hints to the `predict` method.*")

SCORING_SERVER_ENV = "__pyfunc_model_path__"  # set by MLflow's scoring server (mlflow models serve) for its model
# Logged with the model (hsflow.training.tracking.log_model): MLflow lets SERVING_MODEL_CONFIG / load_model(model_config=)
# set only the keys a model was logged with. read_paths: None = the scoring server reads no path, in-process callers
# may; served_as: the registered version being served ({registered_model, version, aliases}: hsflow.serve sets it).
MODEL_CONFIG = {"read_paths": None, "served_as": {}}
RESULTS = ("records", "json", "parts")


def photo_bytes(value) -> bytes:
    """The bytes of a photo from an `image` cell: base64 text (str, or bytes as MLflow's `inputs` format leaves it)
    is decoded; raw file bytes (what `dataframe_split`/`dataframe_records` hand over after MLflow decoded them, or
    an in-process caller's) are kept. A real image file always holds bytes outside the base64 alphabet."""
    if isinstance(value, str):
        return base64.b64decode("".join(value.split()), validate=True)  # line breaks (encodebytes) allowed
    value = bytes(value)
    try:
        return base64.b64decode(b"".join(value.split()), validate=True)
    except (binascii.Error, ValueError):
        return value


def _given(value) -> bool:
    return value is not None and not (isinstance(value, float) and value != value)  # None or NaN: absent


class HSFlowPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from hsflow.models.bundle import load_once

        self.model = load_once(Path(context.artifacts["meta.json"]).parent)  # spark_udf reloads it every task
        config = context.model_config or {}
        # The registered version being served (hsflow.serve resolves the champion and passes it in the model
        # config), so every answer names it as the CLI's and the page's do.
        self.model.source = dict(config.get("served_as") or {})
        read = config.get("read_paths")
        self.read_paths = bool(read) if read is not None else SCORING_SERVER_ENV not in os.environ

    def inputs(self, model_input, grouped: bool = True) -> list:
        """A PhotoInput per row; a row that names no usable photo carries its error (answered in its place).
        grouped=False drops `item`: one answer a row."""
        import pandas as pd

        from hsflow.serving.recommend import PhotoInput

        if not isinstance(model_input, pd.DataFrame):
            model_input = pd.DataFrame({"path": list(model_input)})
        rows = []
        for n, row in enumerate(model_input.to_dict("records")):
            item = str(row["item"]) if grouped and _given(row.get("item")) else None
            if _given(row.get("image")):
                name = str(row["name"]) if _given(row.get("name")) else f"row {n}"
                try:
                    rows.append(PhotoInput(name, photo_bytes(row["image"]), item))
                except (binascii.Error, ValueError, TypeError):
                    rows.append(PhotoInput(name, item=item, error=f"{name}: image is not base64 text"))
            elif _given(row.get("path")):
                path = str(row["path"])
                rows.append(PhotoInput(path, item=item) if self.read_paths else PhotoInput(
                    path, item=item, error=f"{path}: this server reads no paths; send the photo's bytes as image"))
            else:
                rows.append(PhotoInput(f"row {n}", item=item, error=f"row {n}: no image or path given"))
        return rows

    def predict(self, context, model_input, params=None):
        import pandas as pd

        from hsflow.serving.recommend import answer_groups, as_json, iter_parts, iter_recommend, to_json

        params = params or {}
        precedents, result = params.get("precedents"), params.get("result") or "records"
        if result not in RESULTS:
            raise ValueError(f"result={result!r}: choose one of {', '.join(RESULTS)}")
        top_k, precedents = int(params.get("top_k") or 5), None if precedents is None or int(precedents) < 0 \
            else int(precedents)
        if result == "parts":
            return pd.DataFrame({"answer": list(iter_parts(self.model, self.inputs(model_input, grouped=False)))},
                                dtype=object)
        if isinstance(model_input, pd.DataFrame) and "members" in model_input.columns and \
                model_input["members"].map(_given).all():
            rows = model_input.to_dict("records")
            recs = answer_groups(self.model, [(str(r["item"]) if _given(r.get("item")) else f"row {n}", r["members"])
                                              for n, r in enumerate(rows)], top_k, precedents,
                                 params.get("group_key") or "item")
        else:
            recs = iter_recommend(self.model, self.inputs(model_input, grouped=result == "records"), top_k,
                                  num_workers=0, progress=False, precedents=precedents)
        if result == "records":
            return [as_json(rec) for rec in recs]
        return pd.DataFrame({"answer": [to_json(rec) for rec in recs]}, dtype=object)


set_model(HSFlowPyfunc())
