"""Wall-clock time and peak memory of a run's stages (dataset, features, fit, test, ...), for the scale benchmark
(`bench/scale.sh`) and the run's `timings.json` artifact."""
from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import pytorch_lightning as pl


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class StageClock:
    """`mark(name)` closes the stage that began at the previous mark: its seconds and the peak RSS so far."""

    def __init__(self):
        self.t0 = self.last = time.perf_counter()
        self.cpu = time.process_time()
        self.stages: list[dict] = []

    def mark(self, name: str, **extra) -> None:
        now, cpu = time.perf_counter(), time.process_time()
        self.stages.append({"stage": name, "seconds": round(now - self.last, 3), "cpu_seconds": round(cpu - self.cpu, 3),
                            "peak_rss_mb": round(peak_rss_mb(), 1), **extra})
        self.last, self.cpu = now, cpu

    def as_dict(self) -> dict:
        return {"total_seconds": round(time.perf_counter() - self.t0, 3), "stages": self.stages}

    def write(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.as_dict(), indent=1))


class EpochTimer(pl.Callback):
    """Wall and CPU seconds per training epoch (its validation included)."""

    def __init__(self):
        self.seconds: list[float] = []
        self.cpu_seconds: list[float] = []
        self._t = self._c = 0.0

    def on_train_epoch_start(self, trainer, pl_module):
        self._t, self._c = time.perf_counter(), time.process_time()

    def on_train_epoch_end(self, trainer, pl_module):
        self.seconds.append(round(time.perf_counter() - self._t, 3))
        self.cpu_seconds.append(round(time.process_time() - self._c, 3))
