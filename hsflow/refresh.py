"""Entry: train a challenger on new rulings, promote or keep: `python -m hsflow.refresh`."""
from hsflow import entry

entry(__name__, "hsflow.lifecycle.refresh")
