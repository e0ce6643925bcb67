"""Entry: a sweep's table and figures from MLflow: `python -m hsflow.report --experiment NAME`."""
from hsflow import entry

entry(__name__, "hsflow.team.report")
