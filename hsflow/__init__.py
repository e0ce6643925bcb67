"""hsflow: HS-code recommendation from product photos."""
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
ENTRY_POINTS = {"hsflow.train", "hsflow.recommend", "hsflow.bench", "hsflow.serve", "hsflow.review",
                "hsflow.refresh"}


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
