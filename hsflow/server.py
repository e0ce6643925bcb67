"""Entry: a team's tracking server (PostgreSQL + mlflow server): `python -m hsflow.server start|stop`."""
from hsflow import entry

entry(__name__, "hsflow.team.server")
