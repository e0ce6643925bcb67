"""Entry: score a batch of photos on Spark or in-process: `python -m hsflow.score --output OUT DIR ...`."""
from hsflow import entry

entry(__name__, "hsflow.serving.score")
