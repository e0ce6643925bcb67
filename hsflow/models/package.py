"""Kept for MLflow models logged before the saved model folder moved to hsflow.models.bundle: their copied pyfunc code
imports `HSModel` from here. New code imports hsflow.models.bundle."""


def __getattr__(name: str):
    if name in ("HSModel", "load_model"):
        from hsflow.models import bundle  # the one upward import, allowed by name in the import-linter contract

        return getattr(bundle, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
