"""Entry: the raw store's commands (import-archive, check, ...): `python -m hsflow.store`."""
from hsflow import entry

entry(__name__, "hsflow.data.store")
