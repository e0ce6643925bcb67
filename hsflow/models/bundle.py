"""The saved model folder: the whole network (frozen prefix + trained suffix + head) with its classes,
preprocessing, calibration, unknown score and precedent index, saved as plain files (weights.pt + meta.json +
unknown.npz + the precedent index: hsflow.models.precedents) inside an MLflow model. Every door (CLI, MLflow model, REST,
page) answers from one of these folders through hsflow.recommend.

It sits above the model layer (hsflow.models: backbones, head, LightningModule) and above the product features it
bundles (hsflow.models.unknown, hsflow.models.precedents), so the network code never depends on them.

The folder also carries the whole network exported to ONNX (`network.onnx`: a preprocessed batch in, `logits` and
the pooled `embedding` out; hsflow.core.runtime). On a CPU every door answers through ONNX Runtime from it (3-5x torch
eager), with the same codes and probabilities as torch (tests/test_onnx_runtime.py); a model saved without it, a
GPU, or HSFLOW_RUNTIME=torch in the environment (`runtime = "torch"`) answer through torch. `forward_arrays` is the
one seam: preprocessed photos in, (logits, embeddings) out, numpy; torch is imported only where torch runs the
network or saves it, so a folder with network.onnx loads and answers without torch (the precedent index is numpy;
the unknown score and the review rule are hsflow.models.unknown's and hsflow.models.calibration's).

Loading never unpickles arbitrary objects: meta is JSON and the weights load with `torch.load(weights_only=True)`
into a network rebuilt from the backbone class meta.json names (no download: the weights file holds every parameter).
That class must subclass hsflow.models.backbones.Backbone; when its module lies outside hsflow, the folder carries a
copy (`backbone_code/`) which loading imports where the module is not installed: as with MLflow's code_paths, load
models only from sources you trust.
"""
from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from hsflow.core import runtime as rt
from hsflow.core.images import preprocess_array
from hsflow.models.precedents import PrecedentIndex

if TYPE_CHECKING:
    import torch
    from torch import nn

    from hsflow.models.unknown import UnknownScorer

WEIGHTS, META, ONNX = "weights.pt", "meta.json", "network.onnx"
CODE = "backbone_code"  # the module of a backbone class defined outside hsflow, carried by the model (docs/backbones.md)


@dataclass
class HSModel:
    net: nn.Sequential | None  # None: loaded without torch (network.onnx answers)
    meta: dict  # backbone, unfreeze, head, classes, preprocess, temperature, review_threshold, run facts
    precedents: PrecedentIndex | None = field(default=None, repr=False)  # training photos' rulings, if saved
    unknown: UnknownScorer | None = field(default=None, repr=False)  # training embeddings + threshold; None: never
    # Where it was loaded from when that was a registered version: {registered_model, version, aliases} (set by
    # hsflow.recommend.load and the MLflow model; not saved): every answer names the version that gave it.
    source: dict = field(default_factory=dict, repr=False)
    onnx: rt.OnnxNetwork | None = field(default=None, repr=False)  # network.onnx under ONNX Runtime, if saved
    runtime: str = "onnx"  # onnx: answer through `onnx` on a CPU when there is one | torch: always through `net`

    @property
    def classes(self) -> list[str]:
        return self.meta["classes"]

    @property
    def temperature(self) -> float:
        return float(self.meta.get("temperature", 1.0))

    def preprocess(self):
        """PIL RGB -> normalized torch tensor (torchvision), for torch callers; the doors use `preprocess_array`."""
        from hsflow.data.transforms import build_preprocess

        return build_preprocess(self.meta["preprocess"])

    def preprocess_array(self, img) -> np.ndarray:
        """PIL RGB -> the network's float32 CHW input, numpy, to the bit what `preprocess` gives (no torch)."""
        return preprocess_array(img, self.meta["preprocess"])

    def save(self, folder: Path) -> list[Path]:
        import torch

        folder.mkdir(parents=True, exist_ok=True)
        torch.save(self.net.state_dict(), folder / WEIGHTS)
        meta = {k: v for k, v in self.meta.items() if k != "unknown"}
        files = [folder / WEIGHTS, folder / META] + self.export(folder) + self.save_code(folder)
        if self.unknown is not None:
            meta["unknown"] = self.unknown.meta()
            files.append(self.unknown.save(folder))
        (folder / META).write_text(json.dumps(meta, indent=1, ensure_ascii=False))
        return files + (self.precedents.save(folder) if self.precedents else [])

    def save_code(self, folder: Path) -> list[Path]:
        """A copy of the module defining the backbone class when it is not hsflow's (`<folder>/backbone_code/`,
        as its import path): the model rebuilds its network where that module is not installed."""
        import shutil

        from hsflow.models.backbones import module_file

        found = module_file(self.meta["net"]) if self.meta.get("net") else None
        if found is None:
            return []
        module, source = found
        target = folder / CODE / Path(*module.split(".")).with_suffix(".py")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        return [folder / CODE]

    @classmethod
    def load(cls, folder: Path) -> "HSModel":
        """Load from a folder holding meta.json and weights.pt and/or network.onnx (searched recursively: an MLflow
        model dir works). Without torch installed, network.onnx answers and the network in torch is not built."""
        folder = Path(folder)
        metas = [folder / META] if (folder / META).is_file() else sorted(folder.rglob(META))
        if not metas:
            raise FileNotFoundError(f"{folder}: no {META} found; is this an hsflow model?")
        meta, folder = json.loads(metas[0].read_text()), metas[0].parent
        session = _session(folder / ONNX)
        net = _torch_network(meta, folder, needed=session is None)
        if meta.get("unknown"):
            from hsflow.models.unknown import UnknownScorer

            unknown = UnknownScorer.load(folder, meta["unknown"])
        else:
            unknown = None
        return cls(net, meta, PrecedentIndex.load(folder), unknown, onnx=session,
                   runtime=rt.check_runtime(os.environ.get(rt.ENV, "onnx")))

    def export(self, folder: Path) -> list[Path]:
        """network.onnx beside weights.pt; [] (and one warning line: torch will answer) when the export fails."""
        import torch

        from hsflow.models.network import LogitsAndEmbedding

        size = int(self.meta["preprocess"]["size"])
        try:
            return [rt.export(LogitsAndEmbedding(self.net).eval(), torch.zeros(2, 3, size, size), folder / ONNX,
                              ["logits", "embedding"])]
        except Exception as exc:  # noqa: BLE001 - a network the exporter refuses is still a saved model
            rt.warn_once(f"the model is saved without {ONNX}, torch will answer ({rt.unavailable(exc)})")
            return []

    def forward_arrays(self, x: np.ndarray, device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
        """The seam every answer goes through: preprocessed photos (N, 3, H, W float32) -> (logits, pooled
        embeddings), float32 numpy. ONNX Runtime answers on a CPU when the folder carries network.onnx (and runtime
        is onnx); torch otherwise, converting here and nowhere else."""
        if self.through_onnx(device):
            out = self.onnx.run(x)
            return out["logits"], out["embedding"]
        import torch

        logits, emb = self.logits_and_embeddings(torch.from_numpy(np.ascontiguousarray(x)).to(device))
        return logits.cpu().numpy(), emb.cpu().numpy()

    def answer_arrays(self, x: np.ndarray, device: str = "cpu", tta: bool | None = None
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Calibrated class probabilities (softmax of logits / temperature; with the mirror-image TTA if trained
        so), embeddings and raw logits of preprocessed photos, numpy: what hsflow.recommend and the unknown score
        read (the numpy twin of `forward`)."""
        tta = self.meta.get("tta", False) if tta is None else tta
        logits, emb = self.forward_arrays(x, device)
        if tta:
            logits = (logits + self.forward_arrays(np.ascontiguousarray(x[..., ::-1]), device)[0]) / 2
        z = logits / np.float32(self.temperature)
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True), emb, logits

    def through_onnx(self, device: str) -> bool:
        """Whether ONNX Runtime answers on `device` (else torch, which then needs the network placed there)."""
        return self.onnx is not None and (self.runtime == "onnx" or self.net is None) and str(device) == "cpu"

    def logits_and_embeddings(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, pooled embeddings) of a preprocessed torch batch, float32 torch, through the same engine as
        `forward_arrays` (torch callers: training's figures, tests, the bench)."""
        import torch

        if self.through_onnx(x.device.type):
            out = self.onnx.run(x.float().numpy())
            return torch.from_numpy(out["logits"]), torch.from_numpy(out["embedding"])
        with torch.inference_mode():
            emb = self.net[1](self.net[0](x))
            return self.net[2](emb).float(), emb.float()

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        import torch

        with torch.inference_mode():
            return self.net(x)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled embedding of a preprocessed batch: what the head reads (frozen prefix, then the trained
        suffix for unfreeze > 0 models); the precedent index holds the training photos' embeddings."""
        import torch

        with torch.inference_mode():
            return self.net[1](self.net[0](x))

    embedding = embed  # the name hsflow.models.unknown reads it by

    def forward(self, x: torch.Tensor, tta: bool | None = None):
        """Calibrated class probabilities (with the mirror-image TTA if trained so), embeddings and raw logits of a
        preprocessed torch batch, one forward, through the same engine as `forward_arrays` (torch callers)."""
        import torch

        tta = self.meta.get("tta", False) if tta is None else tta
        logits, emb = self.logits_and_embeddings(x)
        if tta:
            logits = (logits + self.logits_and_embeddings(torch.flip(x, dims=[-1]))[0]) / 2
        return torch.softmax(logits / self.temperature, dim=1), emb, logits

    def probabilities_and_embeddings(self, x: torch.Tensor, tta: bool | None = None):
        """Calibrated class probabilities and embeddings, one forward."""
        return self.forward(x, tta)[:2]

    def probabilities(self, x: torch.Tensor, tta: bool | None = None) -> torch.Tensor:
        """Calibrated class probabilities for a preprocessed batch (with the mirror-image TTA if trained so)."""
        return self.forward(x, tta)[0]

    def unknown_scores(self, emb, logits) -> np.ndarray | None:
        """The unknown score of each photo (hsflow.models.unknown, numpy; embeddings and raw logits as numpy arrays or torch
        tensors), None without a scorer."""
        if self.unknown is None:
            return None
        return self.unknown.score(_array(emb), _array(logits))

    def outputs(self, x: torch.Tensor, tta: bool | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Calibrated probabilities and unknown scores (None without a scorer) from one forward pass."""
        import torch

        probs, emb, logits = self.forward(x, tta)
        scores = self.unknown_scores(emb, logits)
        return probs, None if scores is None else torch.from_numpy(scores)


def _array(x) -> np.ndarray:
    """float32 numpy from a numpy array or a torch tensor (any device), without importing torch."""
    return x.detach().float().cpu().numpy() if hasattr(x, "detach") else np.asarray(x, dtype=np.float32)


def _session(path: Path) -> rt.OnnxNetwork | None:
    """network.onnx under ONNX Runtime; None when absent, refused (one warning line) or HSFLOW_RUNTIME=torch."""
    if not path.is_file() or os.environ.get(rt.ENV) == "torch":
        return None
    try:
        return rt.OnnxNetwork(path)
    except Exception as exc:  # noqa: BLE001 - onnxruntime missing or the file refused: torch answers
        rt.warn_once(f"{path} not used, torch answers ({rt.unavailable(exc)})")
        return None


def _torch_network(meta: dict, folder: Path, needed: bool):
    """The network rebuilt in torch from weights.pt; None when torch is not installed and network.onnx answers."""
    try:
        import torch

        from hsflow.models.network import build_network
    except ImportError:
        if needed:
            raise ImportError(f"{folder}: this model has no usable {ONNX}, and torch is not installed to run "
                              f"{WEIGHTS}") from None
        return None
    net = build_network(meta, folder / CODE)
    net.load_state_dict(torch.load(folder / WEIGHTS, map_location="cpu", weights_only=True))
    return net.eval()


def load_model(uri: str) -> HSModel:
    """Load an hsflow model from an MLflow URI (runs:/<id>/model, models:/<name>/<version>) or a local folder."""
    if Path(uri).exists():
        return HSModel.load(Path(uri))
    import mlflow

    return HSModel.load(Path(mlflow.artifacts.download_artifacts(artifact_uri=uri)))


_LOADED: dict[str, HSModel] = {}


def load_once(folder: Path) -> HSModel:
    """`HSModel.load`, once a process and folder (a shallow copy each call: its own `source`, the same network and
    indexes). For the MLflow pyfunc: spark_udf loads the pyfunc again for every task in the same Python worker, and
    MLflow executes the model's code file afresh at each load, so the cache has to live here."""
    key = str(Path(folder).resolve())
    if key not in _LOADED:
        _LOADED[key] = HSModel.load(Path(folder))
    return copy.copy(_LOADED[key])
