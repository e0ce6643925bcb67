"""Which engine runs a network forward: ONNX Runtime on the CPU, torch everywhere else. One module owns the choice.

Frozen work on a CPU (the feature cache's prefix: hsflow.data.features) and the saved model's forward (hsflow.models.bundle) ask
here for "the network". With `runtime: onnx` (conf/train.yaml, the default) and a CPU device, the torch module is
exported once to ONNX (opset `OPSET`, a dynamic batch axis) and run by ONNX Runtime's CPU execution provider, which
runs EfficientNet's depthwise convolutions 2-3x faster than torch eager here (docs/benchmarks.md, `make bench`).
On a GPU, with `runtime: torch`, or when the export or onnxruntime fails, torch runs it (the failure is one warning
line, never a crash). Features agree with torch's within `TOLERANCE` (tests/test_onnx_runtime.py).

The exported prefix is cached beside the feature cache, `<cache_dir>/onnx/`, keyed like it: the prefix's cache id
(backbone, weights, preprocessing, cut point), the input shape, the opset, and the torch and onnxruntime versions.

torch is imported only by the functions that export or wrap torch modules: `OnnxNetwork` and `load_session` need
numpy and onnxruntime alone (the served model's environment has no torch).
"""
from __future__ import annotations

import os
import sys
import uuid
import warnings
from pathlib import Path

import numpy as np

OPSET = 17          # the ONNX opset every export states (TorchScript exporter; ONNX Runtime >= 1.14 runs it)
TOLERANCE = 1e-4    # max |ONNX Runtime - torch| accepted on pooled features (measured ~1e-5: docs/benchmarks.md)
RUNTIMES = ("onnx", "torch")
THREADS_ENV = "HSFLOW_ORT_THREADS"  # intra-op threads of every session this process opens (default: ORT's own)
ENV = "HSFLOW_RUNTIME"  # the doors' switch (recommend, make serve, make review): HSFLOW_RUNTIME=torch answers in torch
INPUT = "input"
_warned: set[str] = set()


def warn_once(message: str) -> None:
    """One line on stderr per distinct reason, however many batches or splits ask again."""
    if message not in _warned:
        _warned.add(message)
        print(f"warning: {message}", file=sys.stderr, flush=True)


def ort_version() -> str | None:
    try:
        import onnxruntime
    except ImportError:
        return None
    return onnxruntime.__version__


def check_runtime(runtime: str) -> str:
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime={runtime!r}: choose one of {', '.join(RUNTIMES)}")
    return runtime


def load_session(path: str | Path, threads: int | None = None):
    """An ONNX Runtime CPU session over `path` (all graph optimizations; `threads` intra-op threads, default: the
    runtime's own, one per physical core)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    threads = threads or os.environ.get(THREADS_ENV)  # make serve --workers N: cores / N each, not N x cores
    if threads:
        opts.intra_op_num_threads = int(threads)
    opts.log_severity_level = 3  # errors only: stderr is for hsflow's own lines
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


class OnnxNetwork:
    """An exported network under ONNX Runtime: float32 NCHW batch (numpy) in, its named outputs (numpy) out."""

    def __init__(self, path: str | Path, threads: int | None = None):
        self.path = Path(path)
        self.session = load_session(path, threads)
        self.outputs = [o.name for o in self.session.get_outputs()]

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        values = self.session.run(None, {INPUT: np.ascontiguousarray(x, dtype=np.float32)})
        return dict(zip(self.outputs, values))


def export(module, example, path: Path, outputs: list[str]) -> Path:
    """Export a torch module (eval mode, float32) to `path` with a dynamic batch axis, written atomically (parallel
    sweep jobs may export the same prefix at once)."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    module = module.eval().to(memory_format=torch.contiguous_format)
    axes = {INPUT: {0: "batch"}} | {name: {0: "batch"} for name in outputs}
    try:  # the exporter's notes (constant folding skipped on strided slices...) are not the user's business
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (example.float().cpu(),), str(tmp), input_names=[INPUT], output_names=outputs,
                              dynamic_axes=axes, opset_version=OPSET, dynamo=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def prefix_path(cache_dir: str | Path, cache_id: str, input_shape: tuple[int, ...]) -> Path:
    import torch

    shape = "x".join(str(int(s)) for s in input_shape)
    return (Path(cache_dir) / "onnx" /
            f"{cache_id}-{shape}-opset{OPSET}-torch{torch.__version__.split('+')[0]}-ort{ort_version()}.onnx")


def torch_forward(module, device: str):
    """The torch path: channels-last convolutions (1.3x faster on this CPU's oneDNN, and what tensor cores want)."""
    import torch

    module = module.to(device).eval().to(memory_format=torch.channels_last)

    def forward(x):
        with torch.inference_mode():
            return module(x.to(device, non_blocking=True)).float().cpu()

    return forward


def frozen_network(module, *, cache_dir: str | Path, cache_id: str, input_shape: tuple[int, ...],
                   device: str = "cpu", runtime: str = "onnx"):
    """The frozen prefix as a function of a preprocessed batch (torch tensor, CPU) to its features (float32 tensor,
    CPU): ONNX Runtime on a CPU with runtime=onnx, else (or when that fails: one warning line) torch."""
    check_runtime(runtime)
    if runtime == "torch" or not str(device).startswith("cpu"):
        return torch_forward(module, device)
    try:
        net = _exported(module, prefix_path(cache_dir, cache_id, input_shape), input_shape)
    except Exception as exc:  # noqa: BLE001 - no onnxruntime, a refused export: torch answers instead
        warn_once(f"ONNX Runtime not used for the frozen network, torch runs it ({unavailable(exc)})")
        return torch_forward(module, device)
    import torch

    return lambda x: torch.from_numpy(net.run(x.cpu().numpy())["features"])


def _exported(module, path: Path, input_shape: tuple[int, ...]) -> OnnxNetwork:
    import torch

    if ort_version() is None:
        raise ImportError("onnxruntime is not installed")
    if not path.is_file():
        export(module.cpu(), torch.zeros(2, *input_shape), path, ["features"])
    return OnnxNetwork(path, torch.get_num_threads())


def unavailable(exc: Exception) -> str:
    """Why the runtime could not be used, in a few words."""
    text = (str(exc).strip().splitlines() or [""])[0][:160]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
