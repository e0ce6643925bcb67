"""Know what it does not know: how far a photo lies from every photo the model was trained on.

A model trained on N codes answers with one of them whatever it is shown; the unknown score says when the answer
means nothing. The score is the cosine distance from the photo's embedding (the network's penultimate output: the
backbone's pooled features, L2-normalised) to its k-th nearest training photo. The training embeddings ship with
the model (`unknown.pt`, float16), the settings and the threshold in meta.json under "unknown".

The threshold is fitted on the validation split only: the lowest score that calls at most 5 % of the validation
photos unknown (`fit_threshold`, which receives nothing else). A photo above it is `unknown`: always needs_review,
its candidates only the nearest trained codes. The choice of the score (kNN over prototypes, energy, max-logit and
combinations) and its k were measured on out-of-scope photos, held-out codes and validation; see docs/unknown.md.

Every door asks the same function: `UnknownScorer.score` on an embedding batch, `UnknownScorer.decide` on scores
(hsflow.recommend per photo, the MLflow pyfunc through it, training for its logged rates).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.functional import normalize

FILE = "unknown.pt"
MAX_VAL_RATE = 0.05  # at most this share of in-distribution validation photos is called unknown
DEFAULT_K = 1
CHUNK = 4096  # query rows per similarity block: bounds memory for large banks


@dataclass
class UnknownScorer:
    bank: torch.Tensor      # (n, d) L2-normalised training embeddings, float16
    threshold: float        # unknown when score > threshold
    k: int = DEFAULT_K      # distance to the k-th nearest training photo
    val_rate: float = 0.0   # share of validation photos called unknown at this threshold (<= MAX_VAL_RATE)

    @torch.inference_mode()
    def score(self, emb: torch.Tensor) -> torch.Tensor:
        """Cosine distance (0 = the same direction, 2 = opposite) of each embedding to its k-th nearest training
        embedding; float32 on the embeddings' device."""
        bank = self._bank32(emb.device)
        k = min(self.k, len(bank))
        out = []
        for part in normalize(emb.float(), dim=1).split(CHUNK):
            out.append(1 - (part @ bank.T).topk(k, dim=1).values[:, k - 1])
        return torch.cat(out) if out else torch.empty(0, device=emb.device)

    def _bank32(self, device: torch.device) -> torch.Tensor:
        """The bank in float32 on `device`, converted once (recommend scores photo by photo: a 13 MB copy each time
        otherwise)."""
        cached = getattr(self, "_cache", None)
        if cached is None or cached.device != torch.device(device):
            cached = self.bank.to(device, torch.float32)
            object.__setattr__(self, "_cache", cached)
        return cached

    def decide(self, scores: torch.Tensor) -> torch.Tensor:
        return scores > self.threshold

    def meta(self) -> dict:
        return {"method": "knn_cosine", "k": self.k, "threshold": self.threshold, "val_rate": self.val_rate,
                "max_val_rate": MAX_VAL_RATE, "bank_size": len(self.bank), "file": FILE}

    def save(self, folder: Path) -> Path:
        torch.save({"bank": self.bank.contiguous()}, folder / FILE)
        return folder / FILE

    @classmethod
    def load(cls, folder: Path, meta: dict) -> "UnknownScorer":
        if meta.get("method") != "knn_cosine":
            raise ValueError(f"unknown score method {meta.get('method')!r} (this hsflow knows knn_cosine)")
        bank = torch.load(folder / meta.get("file", FILE), map_location="cpu", weights_only=True)["bank"]
        return cls(bank, float(meta["threshold"]), int(meta["k"]), float(meta.get("val_rate", 0.0)))


def fit_threshold(val_scores: torch.Tensor, max_rate: float = MAX_VAL_RATE) -> float:
    """The lowest threshold that calls at most `max_rate` of the validation photos unknown (score > threshold).

    Takes validation scores only: no test photo can move it."""
    s = torch.sort(val_scores.float().flatten()).values
    if len(s) == 0:
        raise ValueError("cannot fit the unknown threshold: the validation split is empty")
    allowed = math.floor(max_rate * len(s))  # photos that may lie above the threshold
    return float(s[len(s) - 1 - allowed])


def build_bank(train_emb: torch.Tensor) -> torch.Tensor:
    return normalize(train_emb.float(), dim=1).half()


def fit(train_emb: torch.Tensor, val_emb: torch.Tensor, k: int = DEFAULT_K,
        max_rate: float = MAX_VAL_RATE) -> UnknownScorer:
    """The scorer of a trained model: its training embeddings as the bank, the threshold from validation."""
    scorer = UnknownScorer(build_bank(train_emb), 0.0, k)
    val = scorer.score(val_emb)
    scorer.threshold = fit_threshold(val, max_rate)
    scorer.val_rate = float(scorer.decide(val).float().mean())
    return scorer


# --- leave-codes-out: the photos of codes the dataset held out ----------------------------------------------------

def heldout_photos(cfg) -> tuple[list, list]:
    """Every usable photo of the codes the dataset held out (dataset.exclude_codes), any period: (Samples, Photos)."""
    from hsflow.data.builder import Sample, excluded_codes, usable_photos
    from hsflow.store import RawStore

    codes = excluded_codes(cfg.dataset)
    if not codes:
        return [], []
    photos, _ = usable_photos([p for p in RawStore(cfg.paths.raw_store).photos() if p.hs_code in codes],
                              verbose=False)
    return [Sample(str(p.path), p.sha256, p.rrdc_no, -1, "heldout") for p in photos], photos


def heldout_rates(scorer: UnknownScorer, photos: list, emb: torch.Tensor) -> tuple[float, dict]:
    """The share of the held-out codes' photos called unknown, and a per-code table (for the run's artifact)."""
    flags = scorer.decide(scorer.score(emb))
    per_code: dict = {}
    for p, flag in zip(photos, flags.tolist()):
        row = per_code.setdefault(p.hs_code, {"photos": 0, "unknown": 0})
        row["photos"] += 1
        row["unknown"] += int(flag)
    details = {"threshold": scorer.threshold, "photos": len(photos), "unknown": int(flags.sum()),
               "per_code": dict(sorted(per_code.items()))}
    return float(flags.float().mean()), details
