"""Entry: the model as a REST service (MLflow scoring server): `python -m hsflow.serve`."""
from hsflow import entry

entry(__name__, "hsflow.serving.serve")
