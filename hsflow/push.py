"""Entry: copy a registered model to a team's tracking server: `python -m hsflow.push`."""
from hsflow import entry

entry(__name__, "hsflow.team.push")
