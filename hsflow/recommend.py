"""Entry: suggest HS codes for photos: `python -m hsflow.recommend PHOTO|DIR ...`."""
from hsflow import entry

entry(__name__, "hsflow.serving.recommend")
