"""Precedent rulings: the training photos most like a new photo, with their rulings' facts, saved with the model.

A customs officer argues a classification from earlier rulings on similar goods. Every training photo's pooled
embedding (what the classifier's head reads: `HSModel.embed`) is kept L2-normalized in float16 beside the
weights, with its ruling's number, date, decided code, product name and reasoning, and a small JPEG thumbnail;
a query is one matrix product (cosine similarity), and the k nearest *rulings* (each by its closest photo) are the
precedents. The model folder stays self-contained: nothing reads the raw store at recommend time.

Files in the model folder: precedents.npy (embeddings, float16, read with numpy.load(allow_pickle=False); models
saved before issue 26 have precedents.pt, read with torch.load(weights_only=True)), precedents.json (rulings and
photos), precedent_thumbs.zip (one JPEG per photo, `THUMB_PX` on the long side). Numpy only: the served model's
environment has no torch (embeddings given as torch tensors are converted).
"""
from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hsflow.core.images import PhotoError, open_rgb

EMBEDDINGS, FACTS, THUMBS = "precedents.npy", "precedents.json", "precedent_thumbs.zip"
EMBEDDINGS_V1 = "precedents.pt"  # models saved before issue 26
THUMB_PX, THUMB_QUALITY = 96, 75
DEFAULT_K = 3


@dataclass
class PrecedentIndex:
    embeddings: np.ndarray    # (photos, dim) float16, L2-normalized rows
    photo_ruling: list[int]   # photo row -> index into rulings
    photo_file: list[str]     # photo row -> its file name in the raw store (and in the thumbnail zip)
    rulings: list[dict]       # rrdc_no, date, hs_code (decided), label (the class it trained as), product, reasoning
    thumbs: bytes | None = None  # the zip of thumbnails, kept in memory (a few MB) so the page can serve it
    k: int = DEFAULT_K

    def __post_init__(self):
        self.embeddings = as_array(self.embeddings).astype(np.float16)
        self._matrix = self.embeddings.astype(np.float32)

    def __len__(self) -> int:
        return len(self.photo_file)

    def similarities(self, emb) -> np.ndarray:
        """Cosine similarity of each embedding of a batch to every indexed photo (one pass over the index: a served
        answer reads it for its precedents and for nearest_label, so it is computed once)."""
        return normalize(as_array(emb)) @ self._matrix.T

    def nearest(self, emb, k: int | None = None, sims: np.ndarray | None = None) -> list[list[dict]]:
        """The k most similar rulings for each embedding of a batch (each ruling once, by its closest photo)."""
        k = self.k if k is None else k
        if k <= 0 or not len(self):
            return [[] for _ in range(len(emb))]
        sims = self.similarities(emb) if sims is None else sims
        out = []
        for row in sims:
            order = np.argsort(-row, kind="stable").tolist()
            found: dict[int, dict] = {}
            for i in order:
                r = self.photo_ruling[i]
                if r not in found:
                    found[r] = {**public(self.rulings[r]), "photo": self.photo_file[i],
                                "similarity": round(float(row[i]), 4)}
                    if len(found) == k:
                        break
            out.append(list(found.values()))
        return out

    def nearest_label(self, emb, sims: np.ndarray | None = None) -> list[str]:
        """The class of the single most similar training photo, per embedding (the precedent top-1 measure)."""
        best = (self.similarities(emb) if sims is None else sims).argmax(1).tolist()
        return [self.rulings[self.photo_ruling[i]]["label"] for i in best]

    def thumbnail(self, file: str) -> bytes | None:
        if not self.thumbs:
            return None
        with zipfile.ZipFile(io.BytesIO(self.thumbs)) as zf:
            try:
                return zf.read(file)
            except KeyError:
                return None

    # --- files ---------------------------------------------------------------------------------------------------
    def save(self, folder: Path) -> list[Path]:
        np.save(folder / EMBEDDINGS, np.ascontiguousarray(self.embeddings))
        facts = {"k": self.k, "rulings": self.rulings,
                 "photos": [{"file": f, "ruling": r} for f, r in zip(self.photo_file, self.photo_ruling)]}
        (folder / FACTS).write_text(json.dumps(facts, ensure_ascii=False))
        paths = [folder / EMBEDDINGS, folder / FACTS]
        if self.thumbs:
            (folder / THUMBS).write_bytes(self.thumbs)
            paths.append(folder / THUMBS)
        return paths

    @classmethod
    def load(cls, folder: Path) -> "PrecedentIndex | None":
        """The index saved in a model folder, or None for a model saved without one."""
        if not (folder / FACTS).is_file():
            return None
        facts = json.loads((folder / FACTS).read_text(encoding="utf-8"))
        if (folder / EMBEDDINGS).is_file():
            emb = np.load(folder / EMBEDDINGS, allow_pickle=False)
        else:  # saved before issue 26
            import torch

            emb = torch.load(folder / EMBEDDINGS_V1, map_location="cpu", weights_only=True)["embeddings"]
        thumbs = (folder / THUMBS).read_bytes() if (folder / THUMBS).is_file() else None
        return cls(emb, [p["ruling"] for p in facts["photos"]], [p["file"] for p in facts["photos"]],
                   facts["rulings"], thumbs, int(facts.get("k", DEFAULT_K)))


def as_array(x) -> np.ndarray:
    """float32 numpy rows from a numpy array or a torch tensor (any device), without importing torch."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    x = np.asarray(x)
    return x if x.dtype == np.float16 else x.astype(np.float32, copy=False)


def normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (as torch.nn.functional.normalize: norms under 1e-12 count as 1e-12)."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), np.float32(1e-12))


def public(ruling: dict) -> dict:
    """A ruling as the answer shows it (the class label stays internal)."""
    return {k: ruling[k] for k in ("rrdc_no", "date", "hs_code", "product", "reasoning")}


def thumbnail_jpeg(path: str | Path, px: int = THUMB_PX) -> bytes:
    img = open_rgb(path, draft_size=px)
    img.thumbnail((px, px))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=THUMB_QUALITY, optimize=True)
    return buf.getvalue()


def build(samples, embeddings, classes: list[str], store_root: str | Path,
          k: int = DEFAULT_K, thumbs: bool = True) -> PrecedentIndex:
    """The index over training samples (originals) and their embeddings (aligned), with facts from the store."""
    from hsflow.data.store import RawStore

    wanted = {s.rrdc_no for s in samples}
    records = {r["rrdc_no"]: r for r in RawStore(store_root).rulings() if r["rrdc_no"] in wanted}
    rulings, row_of = [], {}
    photo_ruling, photo_file = [], []
    for s in samples:
        if s.rrdc_no not in row_of:
            fields = records.get(s.rrdc_no, {}).get("fields", {})
            row_of[s.rrdc_no] = len(rulings)
            rulings.append({"rrdc_no": s.rrdc_no, "date": fields.get("ENFR_DT", ""),
                            "hs_code": records.get(s.rrdc_no, {}).get("hs_code", classes[s.label]),
                            "label": classes[s.label], "product": fields.get("CMDT_NM", ""),
                            "reasoning": fields.get("DTRM_RSN_CN", "")})
        photo_ruling.append(row_of[s.rrdc_no])
        photo_file.append(Path(s.path).name)
    zipped = None
    if thumbs:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:  # JPEGs do not compress further
            for s, name in zip(samples, photo_file):
                try:
                    zf.writestr(name, thumbnail_jpeg(s.path))
                except PhotoError:  # the dataset builder already dropped undecodable photos; a race only
                    pass
        zipped = buf.getvalue()
    emb = normalize(as_array(embeddings)).astype(np.float16)
    return PrecedentIndex(emb, photo_ruling, photo_file, rulings, zipped, k)
