"""The saved model folder: the whole network (frozen prefix + trained suffix + head) with its classes,
preprocessing, calibration, unknown score and precedent index, saved as plain files (weights.pt + meta.json +
unknown.pt + the precedent index: hsflow.precedents) inside an MLflow model. Every door (CLI, MLflow model, REST,
page) answers from one of these folders through hsflow.recommend.

It sits above the model layer (hsflow.models: backbones, head, LightningModule) and above the product features it
bundles (hsflow.unknown, hsflow.precedents), so the network code never depends on them.

The folder also carries the whole network exported to ONNX (`network.onnx`: a preprocessed batch in, `logits` and
the pooled `embedding` out; hsflow.runtime). On a CPU every door answers through ONNX Runtime from it (2-3x torch
eager), with the same codes and probabilities as torch (tests/test_onnx_runtime.py); a model saved without it, a
GPU, or HSFLOW_RUNTIME=torch in the environment (`runtime = "torch"`) answer through torch.

Loading never unpickles arbitrary objects: meta is JSON and the weights load with `torch.load(weights_only=True)`
into a network rebuilt from the backbone registry (no download: the weights file holds every parameter).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from hsflow import runtime as rt
from hsflow.data.transforms import build_preprocess
from hsflow.models.network import build_network
from hsflow.precedents import PrecedentIndex
from hsflow.unknown import UnknownScorer

WEIGHTS, META, ONNX = "weights.pt", "meta.json", "network.onnx"


class _LogitsAndEmbedding(nn.Module):
    """The saved network with both outputs every door reads: what is exported to network.onnx."""

    def __init__(self, net: nn.Sequential):
        super().__init__()
        self.net = net

    def forward(self, x):
        emb = self.net[1](self.net[0](x))
        return self.net[2](emb), emb


@dataclass
class HSModel:
    net: nn.Sequential
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
        return build_preprocess(self.meta["preprocess"])

    def save(self, folder: Path) -> list[Path]:
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(self.net.state_dict(), folder / WEIGHTS)
        meta = {k: v for k, v in self.meta.items() if k != "unknown"}
        files = [folder / WEIGHTS, folder / META] + self.export(folder)
        if self.unknown is not None:
            meta["unknown"] = self.unknown.meta()
            files.append(self.unknown.save(folder))
        (folder / META).write_text(json.dumps(meta, indent=1, ensure_ascii=False))
        return files + (self.precedents.save(folder) if self.precedents else [])

    @classmethod
    def load(cls, folder: Path) -> "HSModel":
        """Load from a folder holding weights.pt and meta.json (searched recursively: an MLflow model dir works)."""
        folder = Path(folder)
        metas = [folder / META] if (folder / META).is_file() else sorted(folder.rglob(META))
        if not metas:
            raise FileNotFoundError(f"{folder}: no {META} found; is this an hsflow model?")
        meta = json.loads(metas[0].read_text())
        net = build_network(meta)
        net.load_state_dict(torch.load(metas[0].parent / WEIGHTS, map_location="cpu", weights_only=True))
        unknown = UnknownScorer.load(metas[0].parent, meta["unknown"]) if meta.get("unknown") else None
        onnx = metas[0].parent / ONNX
        try:
            session = rt.OnnxNetwork(onnx) if onnx.is_file() and os.environ.get(rt.ENV) != "torch" else None
        except Exception as exc:  # noqa: BLE001 - onnxruntime missing or the file refused: torch answers
            rt.warn_once(f"{onnx} not used, torch answers ({rt.unavailable(exc)})")
            session = None
        return cls(net.eval(), meta, PrecedentIndex.load(metas[0].parent), unknown, onnx=session,
                   runtime=rt.check_runtime(os.environ.get(rt.ENV, "onnx")))

    def export(self, folder: Path) -> list[Path]:
        """network.onnx beside weights.pt; [] (and one warning line: torch will answer) when the export fails."""
        size = int(self.meta["preprocess"]["size"])
        try:
            return [rt.export(_LogitsAndEmbedding(self.net).eval(), torch.zeros(2, 3, size, size), folder / ONNX,
                              ["logits", "embedding"])]
        except Exception as exc:  # noqa: BLE001 - a network the exporter refuses is still a saved model
            rt.warn_once(f"the model is saved without {ONNX}, torch will answer ({rt.unavailable(exc)})")
            return []

    def logits_and_embeddings(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The seam every answer goes through: a preprocessed batch -> (logits, pooled embeddings), float32. ONNX
        Runtime answers for a CPU batch when the folder carries network.onnx (and runtime is onnx), torch otherwise."""
        if self.onnx is not None and self.runtime == "onnx" and x.device.type == "cpu":
            out = self.onnx.run(x.float().numpy())
            return torch.from_numpy(out["logits"]), torch.from_numpy(out["embedding"])
        with torch.inference_mode():
            emb = self.net[1](self.net[0](x))
            return self.net[2](emb).float(), emb.float()

    @torch.inference_mode()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    @torch.inference_mode()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled embedding of a preprocessed batch: what the head reads (frozen prefix, then the trained
        suffix for unfreeze > 0 models); the precedent index holds the training photos' embeddings."""
        return self.net[1](self.net[0](x))

    embedding = embed  # the name hsflow.unknown reads it by

    @torch.inference_mode()
    def probabilities_and_embeddings(self, x: torch.Tensor, tta: bool | None = None):
        """Calibrated class probabilities (with the mirror-image TTA if trained so) and embeddings, one forward."""
        tta = self.meta.get("tta", False) if tta is None else tta
        logits, emb = self.logits_and_embeddings(x)
        if tta:
            logits = (logits + self.logits_and_embeddings(torch.flip(x, dims=[-1]))[0]) / 2
        return torch.softmax(logits / self.temperature, dim=1), emb

    def probabilities(self, x: torch.Tensor, tta: bool | None = None) -> torch.Tensor:
        """Calibrated class probabilities for a preprocessed batch (with the mirror-image TTA if trained so)."""
        return self.probabilities_and_embeddings(x, tta)[0]

    def outputs(self, x: torch.Tensor, tta: bool | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Calibrated probabilities and unknown scores (None without a scorer) from one forward pass."""
        probs, emb = self.probabilities_and_embeddings(x, tta)
        return probs, (self.unknown.score(emb) if self.unknown is not None else None)


def load_model(uri: str) -> HSModel:
    """Load an hsflow model from an MLflow URI (runs:/<id>/model, models:/<name>/<version>) or a local folder."""
    if Path(uri).exists():
        return HSModel.load(Path(uri))
    import mlflow

    return HSModel.load(Path(mlflow.artifacts.download_artifacts(artifact_uri=uri)))
