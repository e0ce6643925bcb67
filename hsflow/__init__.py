"""hsflow: HS-code recommendation from product photos.

The package is one folder per floor (docs/layout.md); each imports only the floors below it:

    entry modules   hsflow/train.py, recommend.py, ... : the commands users type (`python -m hsflow.<name>`)
    lifecycle/ team/   the refresh loop and the registry's moves | a team's tracking server, push, UI, reports
    training/       the stages of one training run, their evaluation, MLflow logging
    serving/        the saved model's doors: recommend (CLI), the MLflow pyfunc, REST serving, the review page
    models/         the networks, the head, calibration, unknown scores, precedents, the saved model folder
    data/           the raw store, datasets drawn from it, photo loading, the feature cache
    core/           config paths, image decoding, the HS nomenclature, runtimes, timing
"""
import importlib
import importlib.abc
import importlib.util
import os
import sys

__version__ = "0.1.0"

# Nothing leaves the machine unasked: MLflow 3 reports usage to its telemetry service from every process that
# imports it unless told not to. hsflow's processes (and the MLflow servers they start, which inherit the
# environment) tell it not to; a user who wants to share usage sets MLFLOW_DISABLE_TELEMETRY=false.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

# glibc hands every allocation above 32 MB (a batch of feature maps) back to the kernel when it is freed, so each
# forward pass pays page faults for fresh zeroed memory: on CPU that was half the wall-clock of feature extraction
# (14.8 photos/s; 49 with the heap kept, measured by `make bench`). glibc reads these settings only at process
# start, so hsflow's own commands restart themselves once with them set (before torch is imported). Library users
# and test runners are left alone; HSFLOW_MALLOC=0 opts out.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(4 << 30), "MALLOC_TRIM_THRESHOLD_": str(64 << 30)}
ENTRY_POINTS = {"hsflow.train", "hsflow.recommend", "hsflow.score", "hsflow.serve", "hsflow.review", "hsflow.refresh"}


def _restart_with_heap_kept() -> None:
    argv = getattr(sys, "orig_argv", [])
    if (sys.platform != "linux" or os.environ.get("HSFLOW_MALLOC") == "0" or "MALLOC_MMAP_THRESHOLD_" in os.environ
            or "-m" not in argv[:-1] or argv[argv.index("-m") + 1] not in ENTRY_POINTS):
        return
    import platform
    if platform.libc_ver()[0] != "glibc":
        return
    os.environ.update(MALLOC_ENV)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *argv[1:]])


_restart_with_heap_kept()


# Where each module of the flat layout (before the layer folders) lives now. Models logged before the move import
# these names from the code they carry (their python_model file does `from hsflow.bundle import HSModel`), and
# scripts written against them keep working: the old name is the same module object as the new one.
MOVED = {
    "config": "core.config", "images": "core.images", "hs": "core.hs", "runtime": "core.runtime",
    "timing": "core.timing", "store": "data.store", "synth": "data.synth", "features": "data.features",
    "calibration": "models.calibration", "metrics": "models.metrics", "unknown": "models.unknown",
    "precedents": "models.precedents", "bundle": "models.bundle", "registry": "serving.registry",
    "recommend": "serving.recommend", "pyfunc": "serving.pyfunc", "serve": "serving.serve",
    "review": "serving.review", "evaluation": "training.evaluation", "tracking": "training.tracking",
    "stages": "training.stages", "train": "training.train", "periods": "lifecycle.periods",
    "decision": "lifecycle.decision", "refresh": "lifecycle.refresh", "server": "team.server", "push": "team.push",
    "ui": "team.ui", "report": "team.report",
}


class _Alias(importlib.abc.Loader):
    def __init__(self, target: str):
        self.target = target

    def create_module(self, spec):
        return importlib.import_module(self.target)

    def exec_module(self, module):
        pass  # the target module ran when it was imported


class _MovedFinder(importlib.abc.MetaPathFinder):
    """`import hsflow.bundle` gives hsflow.models.bundle (the same module object), for every name in MOVED that
    is not an entry module on disk (those alias themselves through `entry`)."""

    def find_spec(self, fullname, path=None, target=None):
        head, _, tail = fullname.partition(".")
        if head != __name__ or tail not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, _Alias(f"{__name__}.{MOVED[tail]}"))


if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
    # After the path finder: the entry modules on disk (hsflow/training/train.py, ...) answer their own names first.
    sys.meta_path.append(_MovedFinder())


def entry(name: str, target: str, function: str = "main") -> None:
    """The body of an entry module (hsflow/training/train.py, ...): run as `python -m hsflow.<name>` it calls the
    implementation's `function` and exits with what it returns; imported, it *is* the implementation module, so
    `from hsflow.recommend import iter_recommend` keeps working."""
    module = importlib.import_module(target)
    if name == "__main__":
        code = getattr(module, function)()
        sys.exit(code if isinstance(code, int) else 0)
    sys.modules[name] = module
