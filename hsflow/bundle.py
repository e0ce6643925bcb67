"""The saved model folder: the whole network (frozen prefix + trained suffix + head) with its classes,
preprocessing, calibration, unknown score and precedent index, saved as plain files (weights.pt + meta.json +
unknown.npz + the precedent index: hsflow.precedents) inside an MLflow model. Every door (CLI, MLflow model, REST,
page) answers from one of these folders through hsflow.recommend.

It sits above the model layer (hsflow.models: backbones, head, LightningModule) and above the product features it
bundles (hsflow.unknown, hsflow.precedents), so the network code never depends on them.

Loading never unpickles arbitrary objects: meta is JSON and the weights load with `torch.load(weights_only=True)`
into a network rebuilt from the backbone registry (no download: the weights file holds every parameter).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from hsflow.data.transforms import build_preprocess
from hsflow.models.network import build_network
from hsflow.precedents import PrecedentIndex
from hsflow.unknown import UnknownScorer

WEIGHTS, META = "weights.pt", "meta.json"


@dataclass
class HSModel:
    net: nn.Sequential
    meta: dict  # backbone, unfreeze, head, classes, preprocess, temperature, review_threshold, run facts
    precedents: PrecedentIndex | None = field(default=None, repr=False)  # training photos' rulings, if saved
    unknown: UnknownScorer | None = field(default=None, repr=False)  # training embeddings + threshold; None: never
    # Where it was loaded from when that was a registered version: {registered_model, version, aliases} (set by
    # hsflow.recommend.load and the MLflow model; not saved): every answer names the version that gave it.
    source: dict = field(default_factory=dict, repr=False)

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
        files = [folder / WEIGHTS, folder / META]
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
        return cls(net.eval(), meta, PrecedentIndex.load(metas[0].parent), unknown)

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
    def forward(self, x: torch.Tensor, tta: bool | None = None):
        """Calibrated class probabilities (with the mirror-image TTA if trained so), embeddings and raw logits of a
        preprocessed batch, one forward: what every answer and the unknown score read."""
        tta = self.meta.get("tta", False) if tta is None else tta
        emb = self.embed(x)
        logits = self.net[2](emb)
        if tta:
            logits = (logits + self.net(torch.flip(x, dims=[-1]))) / 2
        return torch.softmax(logits / self.temperature, dim=1), emb, logits

    def probabilities_and_embeddings(self, x: torch.Tensor, tta: bool | None = None):
        """Calibrated class probabilities and embeddings, one forward."""
        return self.forward(x, tta)[:2]

    def probabilities(self, x: torch.Tensor, tta: bool | None = None) -> torch.Tensor:
        """Calibrated class probabilities for a preprocessed batch (with the mirror-image TTA if trained so)."""
        return self.forward(x, tta)[0]

    def unknown_scores(self, emb: torch.Tensor, logits: torch.Tensor) -> torch.Tensor | None:
        """The unknown score of each photo (hsflow.unknown, numpy), None without a scorer."""
        if self.unknown is None:
            return None
        return torch.from_numpy(self.unknown.score(emb.float().cpu().numpy(), logits.float().cpu().numpy()))

    def outputs(self, x: torch.Tensor, tta: bool | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Calibrated probabilities and unknown scores (None without a scorer) from one forward pass."""
        probs, emb, logits = self.forward(x, tta)
        return probs, self.unknown_scores(emb, logits)


def load_model(uri: str) -> HSModel:
    """Load an hsflow model from an MLflow URI (runs:/<id>/model, models:/<name>/<version>) or a local folder."""
    if Path(uri).exists():
        return HSModel.load(Path(uri))
    import mlflow

    return HSModel.load(Path(mlflow.artifacts.download_artifacts(artifact_uri=uri)))
