"""Entry: the review page: `python -m hsflow.review`."""
from hsflow import entry

entry(__name__, "hsflow.serving.review")
