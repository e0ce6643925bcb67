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
        self.stages: list[dict] = []

    def mark(self, name: str, **extra) -> None:
        now = time.perf_counter()
        self.stages.append({"stage": name, "seconds": round(now - self.last, 3), "peak_rss_mb": round(peak_rss_mb(), 1),
                            **extra})
        self.last = now

    def as_dict(self) -> dict:
        return {"total_seconds": round(time.perf_counter() - self.t0, 3), "stages": self.stages}

    def write(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.as_dict(), indent=1))


class EpochTimer(pl.Callback):
    """Seconds per training epoch (its validation included)."""

    def __init__(self):
        self.seconds: list[float] = []
        self._t = 0.0

    def on_train_epoch_start(self, trainer, pl_module):
        self._t = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        self.seconds.append(round(time.perf_counter() - self._t, 3))
