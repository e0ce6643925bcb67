"""Know what it does not know: how unlike the trained products a photo is.

A model trained on N codes answers with one of them whatever it is shown; the unknown score says when the answer
means nothing. Every score reads the photo's embedding (the network's penultimate output: what the head reads) and
its logits; higher means less like anything trained:

| method   | score |
|----------|-------|
| knn      | cosine distance to the k-th nearest training photo's embedding |
| rmd      | relative Mahalanobis distance (Ren et al. 2021): the distance to the nearest class mean under a shared
             covariance minus the distance to one class-agnostic Gaussian of all training photos, in a PCA space
             fitted on the training photos |
| msp      | 1 - the maximum calibrated softmax probability (Hendrycks & Gimpel 2017) |
| energy   | -logsumexp of the logits (Liu et al. 2020) |
| rmd_msp  | rmd and msp each turned into its quantile among the validation photos' scores, then averaged (default) |

Why the fused score: on frozen features, photos of codes the model never learned lie *near* trained photos (look-alike
siblings: oat yoghurt beside dairy yoghurt), so distances alone barely separate them (nearest photo: AUROC ~0.55),
while the head's uncertainty and the class-relative Mahalanobis distance each see part of it; their quantiles
averaged reach ~0.8 (docs/unknown.md, chosen on validation with codes held out that are not the reported ones).

Everything here is numpy: the served model needs no torch. The scorer's arrays ship in the model folder
(`unknown.npz`), its settings and threshold in meta.json under "unknown". The threshold is fitted on the validation
split only (`fit_threshold`: at most `max_val_rate` of its photos called unknown). A photo above it is `unknown`: it
is never answered unflagged, its candidates only the nearest trained codes (hsflow.models.calibration.outcome, the one rule).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

FILE = "unknown.npz"
METHODS = ("knn", "rmd", "msp", "energy", "rmd_msp")
FUSED = {"rmd_msp": ("rmd", "msp")}  # a fused method: the components whose validation quantiles it averages
DEFAULT_METHOD = "rmd_msp"
MAX_VAL_RATE = 0.05
DEFAULT_K = 1
PCA_DIM = 1024     # the Gaussians live in this many principal directions of the training embeddings
SHRINKAGE = 0.1    # covariance shrunk towards its mean eigenvalue this much: stable with few photos per code
NORMALIZE = "l2"   # rmd's input: l2 (unit length first) | none (the embedding as the head reads it)
# Chosen on the CHOICE codes against 2018 (studies/unknown_sweep.py, docs/unknown.md): PCA 1024 and shrinkage 0.1 read
# the highest fused AUROC there; unit length ties raw embeddings (0.623 vs 0.625) and, unlike them, still calls
# a texture photo unknown on the tiny test store. The REPORT codes were read after, never chosen on.
CHUNK = 4096       # query rows per similarity block: bounds memory for large banks


def _l2(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def _logsumexp(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    m = z.max(axis=1, keepdims=True)
    return (m + np.log(np.exp(z - m).sum(axis=1, keepdims=True)))[:, 0]


def quantile(sorted_ref: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Where each score falls among the reference (validation) scores, continuous (the i-th lowest of n at
    (i + 0.5) / n, linear between, so float noise moves it by as little): above the highest it keeps growing by the
    upper half's spread (a photo far beyond every validation photo on one score must be able to outrank one that is
    merely the highest on both)."""
    ref, scores = np.asarray(sorted_ref, np.float64), np.asarray(scores, np.float64)
    n = len(ref)
    q = np.interp(scores, ref, (np.arange(n) + 0.5) / n)
    spread = max(ref[-1] - ref[n // 2], 1e-12)
    return np.where(scores > ref[-1], (n - 0.5) / n + (scores - ref[-1]) / spread, q)


@dataclass
class UnknownScorer:
    method: str                 # one of METHODS: what `score` returns and `decide` thresholds
    threshold: float            # unknown when score > threshold
    arrays: dict = field(repr=False)  # bank (knn); center, proj, means, proj0 (rmd); val_<component> sorted
    temperature: float = 1.0    # the model's calibration temperature (msp)
    k: int = DEFAULT_K          # knn: distance to the k-th nearest training photo
    val_rate: float = 0.0       # share of validation photos called unknown at this threshold
    max_val_rate: float = MAX_VAL_RATE
    normalize: str = "l2"       # rmd's input (models saved before this setting normalised)
    # The validation photos' components under the reference fit (before the refit learned them): what the threshold
    # and the review threshold were fitted on. Not saved (their sorted values are, in arrays["val_<component>"]).
    reference: dict = field(default_factory=dict, repr=False)

    # -- the components --------------------------------------------------------------------------------------------
    def knn(self, emb: np.ndarray) -> np.ndarray:
        bank = self.arrays["bank"].astype(np.float32)
        k = min(self.k, len(bank))
        out = [1 - np.partition(part @ bank.T, -k, axis=1)[:, -k] for part in np.array_split(
            _l2(emb), max(1, math.ceil(len(emb) / CHUNK)))] if len(emb) else []
        return np.concatenate(out) if out else np.empty(0, np.float32)

    def rmd(self, emb: np.ndarray) -> np.ndarray:
        a = self.arrays
        x = (_l2(emb) if self.normalize == "l2" else np.asarray(emb, np.float32)) - a["center"]
        z, z0 = x @ a["proj"], x @ a["proj0"]
        means = a["means"]
        d = (z * z).sum(1)[:, None] - 2 * z @ means.T + (means * means).sum(1)[None, :]
        return (d.min(1) - (z0 * z0).sum(1)).astype(np.float32)

    def msp(self, logits: np.ndarray) -> np.ndarray:
        return (1 - softmax(logits, self.temperature).max(1)).astype(np.float32)

    @staticmethod
    def energy(logits: np.ndarray) -> np.ndarray:
        return (-_logsumexp(logits)).astype(np.float32)

    def components(self, emb: np.ndarray, logits: np.ndarray) -> dict[str, np.ndarray]:
        """Every score this scorer can give (a method needs its arrays: knn its bank, rmd its Gaussians)."""
        emb, logits = np.asarray(emb, np.float32), np.asarray(logits, np.float32)
        out = {"msp": self.msp(logits), "energy": self.energy(logits)}
        if "bank" in self.arrays:
            out["knn"] = self.knn(emb)
        if "proj" in self.arrays:
            out["rmd"] = self.rmd(emb)
        return self.fuse(out)

    def fuse(self, out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """`out` (component -> scores) with every fused score its parts and validation quantiles allow."""
        for name, parts in FUSED.items():
            if all(f"val_{p}" in self.arrays for p in parts) and all(p in out for p in parts):
                out[name] = np.mean([quantile(self.arrays[f"val_{p}"], out[p]) for p in parts], axis=0)
        return out

    def refer(self, comps: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Take `comps` (component -> the reference photos' scores) as the reference whose quantiles the fused scores
        read (arrays["val_<component>"]); returns `comps` with the fused scores of the reference photos."""
        self.arrays.update({f"val_{n}": np.sort(v).astype(np.float32) for n, v in comps.items()})
        return self.fuse(comps)

    def score(self, emb: np.ndarray, logits: np.ndarray) -> np.ndarray:
        """The chosen method's score of each photo (embeddings and raw logits, one row a photo)."""
        if self.method in FUSED:
            parts = FUSED[self.method]
            comp = {p: getattr(self, p)(emb if p in ("knn", "rmd") else logits) for p in parts}
            return np.mean([quantile(self.arrays[f"val_{p}"], comp[p]) for p in parts], axis=0).astype(np.float32)
        if self.method in ("knn", "rmd"):
            return getattr(self, self.method)(np.asarray(emb, np.float32))
        return getattr(self, self.method)(np.asarray(logits, np.float32))

    def decide(self, scores) -> np.ndarray:
        return np.asarray(scores) > self.threshold

    # -- the model folder ------------------------------------------------------------------------------------------
    def meta(self) -> dict:
        return {"method": self.method, "k": self.k, "threshold": self.threshold, "val_rate": self.val_rate,
                "max_val_rate": self.max_val_rate, "temperature": self.temperature, "normalize": self.normalize,
                "bank_size": int(len(self.arrays["bank"])) if "bank" in self.arrays else 0, "file": FILE}

    def save(self, folder: Path) -> Path:
        np.savez(folder / FILE, **self.arrays)
        return folder / FILE

    @classmethod
    def load(cls, folder: Path, meta: dict) -> "UnknownScorer":
        method = meta.get("method")
        if method == "knn_cosine" and meta.get("file", "").endswith(".pt"):
            return _legacy(folder, meta)
        if method not in METHODS:
            raise ValueError(f"unknown score method {method!r} (this hsflow knows {', '.join(METHODS)})")
        with np.load(folder / meta.get("file", FILE)) as npz:
            arrays = {k: npz[k] for k in npz.files}
        return cls(method, float(meta["threshold"]), arrays, float(meta.get("temperature", 1.0)),
                   int(meta.get("k", DEFAULT_K)), float(meta.get("val_rate", 0.0)),
                   float(meta.get("max_val_rate", MAX_VAL_RATE)), str(meta.get("normalize", "l2")))


def _legacy(folder: Path, meta: dict) -> UnknownScorer:
    """A model saved before the scores moved to numpy (unknown.pt, knn only): still answers the same."""
    import torch

    bank = torch.load(folder / meta["file"], map_location="cpu", weights_only=True)["bank"].float().numpy()
    return UnknownScorer("knn", float(meta["threshold"]), {"bank": bank.astype(np.float16)}, 1.0,
                         int(meta["k"]), float(meta.get("val_rate", 0.0)))


# --- fitting -------------------------------------------------------------------------------------------------------

def fit_threshold(val_scores, max_rate: float = MAX_VAL_RATE) -> float:
    """The lowest threshold that calls at most `max_rate` of the validation photos unknown (score > threshold).

    Takes validation scores only: no test photo can move it."""
    s = np.sort(np.asarray(val_scores, dtype=np.float64).ravel())
    if len(s) == 0:
        raise ValueError("cannot fit the unknown threshold: the validation split is empty")
    allowed = math.floor(max_rate * len(s) + 1e-9)  # photos that may lie above the threshold
    return float(s[len(s) - 1 - allowed])


def _whitener(cov: np.ndarray, shrinkage: float) -> np.ndarray:
    """W with W^T cov_shrunk W = I: Mahalanobis distances become Euclidean after multiplying by W."""
    p = len(cov)
    cov = (1 - shrinkage) * cov + shrinkage * np.trace(cov) / p * np.eye(p)
    vals, vecs = np.linalg.eigh(cov)
    return vecs / np.sqrt(np.maximum(vals, 1e-12))


def gaussians(train_emb: np.ndarray, train_labels: np.ndarray, pca_dim: int = PCA_DIM,
              shrinkage: float = SHRINKAGE, normalize: str = NORMALIZE) -> dict[str, np.ndarray]:
    """The relative Mahalanobis score's arrays from the training photos: the PCA centre, the projections that whiten
    the shared within-class covariance (proj) and the all-photo covariance (proj0), the class means after proj."""
    if normalize not in ("l2", "none"):
        raise ValueError(f"unknown.normalize={normalize!r}: choose none or l2")
    x = (_l2(train_emb) if normalize == "l2" else np.asarray(train_emb, np.float32)).astype(np.float64)
    center = x.mean(0)
    xc = x - center
    p = max(1, min(pca_dim, len(x) - 1, x.shape[1]))
    _, _, vt = np.linalg.svd(xc, full_matrices=False)
    basis = vt[:p].T                                         # (d, p)
    z = xc @ basis
    labels = np.asarray(train_labels)
    classes = np.unique(labels)
    means = np.stack([z[labels == c].mean(0) for c in classes])
    within = z - means[np.searchsorted(classes, labels)]
    proj = basis @ _whitener(within.T @ within / len(z), shrinkage)
    proj0 = basis @ _whitener(z.T @ z / len(z), shrinkage)
    return {"center": center.astype(np.float32), "proj": proj.astype(np.float32), "proj0": proj0.astype(np.float32),
            "means": ((means @ basis.T) @ proj).astype(np.float32)}


def fit(train_emb, train_labels, val_emb, val_logits, temperature: float = 1.0, method: str = DEFAULT_METHOD,
        max_rate: float = MAX_VAL_RATE, k: int = DEFAULT_K, pca_dim: int = PCA_DIM, *, val_labels=None,
        normalize: str = NORMALIZE, shrinkage: float = SHRINKAGE) -> UnknownScorer:
    """The scorer of a trained model. Its validation reference (each component's scores, the threshold) comes from
    a fit on the training photos alone, with `val_logits` from the model before any refit: what a photo the model
    never saw meets. With `val_labels` (make train's refit) the shipped bank and Gaussians then learn the validation
    photos too, as the refit head does: the later collection's look is then part of "known" (docs/unknown.md)."""
    if method not in METHODS:
        raise ValueError(f"unknown.method={method!r}: choose one of {', '.join(METHODS)}")
    train_emb, val_emb = np.asarray(train_emb, np.float32), np.asarray(val_emb, np.float32)

    def arrays_of(emb, labels):
        return {"bank": _l2(emb).astype(np.float16), **gaussians(emb, labels, pca_dim, shrinkage, normalize)}

    ref = UnknownScorer(method, 0.0, arrays_of(train_emb, train_labels), float(temperature), int(k), 0.0,
                        float(max_rate), normalize)
    comps = ref.refer(ref.components(val_emb, val_logits))  # no validation quantiles before: no fused scores
    val_sorted = {k: v for k, v in ref.arrays.items() if k.startswith("val_")}
    val = comps[method].astype(np.float32)
    ref.threshold = fit_threshold(val, max_rate)
    ref.val_rate = float(ref.decide(val).mean())
    ref.reference = {**comps, "score": val}
    if val_labels is None:
        return ref
    final = arrays_of(np.concatenate([train_emb, val_emb]), np.concatenate([np.asarray(train_labels),
                                                                              np.asarray(val_labels)]))
    return replace(ref, arrays={**final, **val_sorted})


# --- evaluation: how well a score separates held-out codes' photos from trained ones ---------------------------

def auroc(known: np.ndarray, unknown: np.ndarray) -> float:
    """P(an unknown photo scores higher than a known one), ties counting half (the Mann-Whitney AUROC)."""
    from scipy.stats import mannwhitneyu

    if not len(known) or not len(unknown):
        return float("nan")
    return float(mannwhitneyu(unknown, known).statistic / (len(known) * len(unknown)))


def fpr_at_tpr(known: np.ndarray, unknown: np.ndarray, tpr: float = 0.95) -> float:
    """The share of known photos flagged at the threshold that catches `tpr` of the unknown ones."""
    if not len(known) or not len(unknown):
        return float("nan")
    t = np.quantile(np.asarray(unknown, np.float64), 1 - tpr, method="lower")
    return float((np.asarray(known) >= t).mean())


def separation(known: dict[str, np.ndarray], unknown: dict[str, np.ndarray]) -> dict[str, float]:
    """AUROC and FPR at 95 % TPR of every component scored on both sets (name -> value)."""
    out = {}
    for name in sorted(set(known) & set(unknown)):
        out[f"auroc_{name}"] = auroc(known[name], unknown[name])
        out[f"fpr95_{name}"] = fpr_at_tpr(known[name], unknown[name])
    return out


# --- leave-codes-out: the photos of codes the dataset held out ----------------------------------------------------

def heldout_photos(cfg) -> tuple[list, list]:
    """Every usable photo of the codes the dataset held out (dataset.exclude_codes), any period: (Samples, Photos)."""
    from hsflow.data.builder import Sample, excluded_codes, usable_photos
    from hsflow.data.store import RawStore

    codes = excluded_codes(cfg.dataset)
    if not codes:
        return [], []
    photos, _ = usable_photos([p for p in RawStore(cfg.paths.raw_store).photos() if p.hs_code in codes],
                              verbose=False)
    return [Sample(str(p.path), p.sha256, p.rrdc_no, -1, "heldout") for p in photos], photos


def per_code(photos: list, flags: np.ndarray, unflagged: np.ndarray) -> dict:
    """Per held-out code: photos, how many were called unknown, how many were answered with no flag at all."""
    rows: dict = {}
    for p, flag, ok in zip(photos, np.asarray(flags).tolist(), np.asarray(unflagged).tolist()):
        row = rows.setdefault(p.hs_code, {"photos": 0, "unknown": 0, "unflagged": 0})
        row["photos"] += 1
        row["unknown"] += int(flag)
        row["unflagged"] += int(ok)
    return dict(sorted(rows.items()))
