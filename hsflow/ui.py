"""Entry: the MLflow UI over the project's store: `python -m hsflow.ui`."""
from hsflow import entry

entry(__name__, "hsflow.team.ui")
