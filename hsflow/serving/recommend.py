"""`python -m hsflow.recommend [--model URI] PATH...`: the top-k HS codes for product photos, with the nomenclature.

For each photo: the k most probable codes with their calibrated probability and the official descriptions of
subheading, heading and chapter, the probabilities rolled up to chapters and headings, and `needs_review` when the
top probability is under the model's review threshold (chosen on validation for a target precision); `unknown`
when the photo lies farther from every training photo than validation photos do (hsflow.models.unknown): then it always
needs review and its codes are only the nearest trained ones; and the precedents: the training rulings whose photos
look most alike (hsflow.models.precedents), with whether the nearest one's code agrees with the top candidate; and which
model answered (`model`: its run and, for a registered version, name, version and aliases). Without --model the
registered model's `champion` answers, else the latest `make train` model (hsflow.serving.registry.default_model_uri, the
rule of every door; docs/refresh.md). Photos
(files, or bytes as PhotoInput) are
decoded and preprocessed exactly as training did (`open_rgb` with JPEG draft decoding at the resize size, then
the model's preprocessing), so top-1 on a test split equals the test top-1 the training run logged.

Exit status: 0 every photo recommended, 1 some photo failed (its own error line), 2 usage error (bad option,
model that cannot be loaded, no photo found).
"""
from __future__ import annotations

import argparse
import base64
import json
import math
import os
import pickle
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from hsflow.core import hs  # noqa: E402
from hsflow.models.bundle import HSModel  # noqa: E402
from hsflow.models.calibration import ANSWER, outcome  # noqa: E402
from hsflow.core.config import default_tracking_uri  # noqa: E402
from hsflow.core.images import PhotoError, open_rgb  # noqa: E402
from hsflow.models.precedents import normalize  # noqa: E402

UNKNOWN_MARK = "[UNKNOWN: not like any trained product]"
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
PROGRESS_MIN = 100  # photos; fewer finish before a bar is worth drawing


@dataclass(frozen=True)
class PhotoInput:
    """One photo to recommend for: a file on this machine, or the bytes of a file (an upload, a REST request)."""
    name: str                  # how the answer names the photo: its path, or the uploaded file's name
    data: bytes | None = None  # the file's bytes; None: read the file at `name`
    item: str | None = None    # photos sharing an item are one recommendation (the mean of their probabilities)
    error: str | None = None   # refused before decoding (an upload too large, of the wrong type): answered so


@dataclass
class Recommendation:
    image: str                      # the photo; for a group of photos, the folder or item
    candidates: list[dict]          # {hs_code, probability, description, heading, chapter}, best first
    rollup: dict                    # {"chapters": {code: p}, "headings": {code: p}}, the top_k of each
    needs_review: bool
    error: str | None = None        # one line '<path>: <reason>' when the photo could not be used
    images: list[str] | None = None  # a group: the photos whose probabilities were combined
    totals: dict = field(default_factory=dict, repr=False)  # the rollup over every chapter and heading (table)
    precedents: list[dict] = field(default_factory=list)  # the most similar training rulings, most similar first
    precedent_agrees: bool | None = None  # nearest precedent's code == the top candidate's (None: no precedent)
    group_key: str = "folder"       # a group's name field: "folder" (--group-by folder) or "item"
    unknown: bool = False           # unlike every trained product (hsflow.models.unknown); then needs_review too
    unknown_score: float | None = None  # None: no photo scored (an error, or a model without a scorer)
    unknown_threshold: float | None = field(default=None, repr=False)  # the model's, for the table
    model: dict = field(default_factory=dict)  # which model answered: answering(model)
    outcome: str = "needs_review"   # answer | needs_review | unknown (hsflow.models.calibration.outcome); errors: review

    def to_dict(self) -> dict:
        where = {"image": self.image} if self.images is None else {self.group_key: self.image, "images": self.images}
        return {**where, "outcome": self.outcome, "candidates": self.candidates, "rollup": self.rollup,
                "needs_review": self.needs_review, "unknown": self.unknown, "unknown_score": self.unknown_score,
                "precedents": self.precedents, "precedent_agrees": self.precedent_agrees, "error": self.error,
                "model": self.model}


# --- model -------------------------------------------------------------------------------------------------------

def tracking_uri() -> str:
    """The store `hsflow.train` logs to by default: MLFLOW_TRACKING_URI, else the project's SQLite file."""
    return default_tracking_uri()


def load(uri: str) -> HSModel:
    """An hsflow model from a local folder or an MLflow URI (runs:/<id>/model, models:/<name>/<version>,
    models:/<name>@<alias>: the alias is resolved once, and the model remembers the version in `source`).

    Only JSON and tensors are read (`torch.load(weights_only=True)`): no pickled code runs, whatever the source.
    """
    if Path(uri).exists():
        return HSModel.load(Path(uri))
    if ":/" not in uri:
        raise FileNotFoundError(f"no such folder, and not an MLflow URI (runs:/<run id>/model, "
                                f"models:/<name>/<version>)")
    import mlflow

    store = tracking_uri()
    if store.startswith("sqlite:///") and not Path(store.removeprefix("sqlite:///")).is_file():
        raise FileNotFoundError(f"no tracking store at {store} (train a model first, or set MLFLOW_TRACKING_URI)")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # stderr is for errors
    from hsflow.serving.registry import identify

    uri, source = identify(uri, store)
    with _global_tracking_uri(store), tempfile.TemporaryDirectory(prefix="hsflow-model-") as tmp:
        folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp))
        if not any(folder.rglob("meta.json")):  # name the URI, not the temporary folder
            raise FileNotFoundError(f"{uri}: its artifacts hold no meta.json (deleted, or not an hsflow model)")
        model = HSModel.load(folder)
    model.source = source
    return model


@contextmanager
def _global_tracking_uri(uri: str):
    """Point MLflow's process-wide tracking URI at `uri`, then restore it and MLFLOW_TRACKING_URI exactly.

    MLflow 3 resolves runs:/ and models:/ URIs to logged models partly through the global URI (a default client
    inside ModelsArtifactRepository ignores download_artifacts' tracking_uri), so the argument alone is not enough.
    """
    import mlflow
    from mlflow.tracking._tracking_service import utils

    saved, saved_env = getattr(utils, "_tracking_uri", None), os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved)
        if saved_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved_env


def load_error(uri: str, exc: Exception) -> str:
    """The reason a model did not load, in one line."""
    if isinstance(exc, pickle.UnpicklingError):
        return "refused: weights.pt holds objects other than tensors (read with torch.load(weights_only=True))"
    if isinstance(exc, KeyError):
        return f"not an hsflow model (meta.json lacks {exc})"
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return f"{reason} (tracking store {tracking_uri()})" if ":/" in uri and not Path(uri).exists() else reason


# --- photos ------------------------------------------------------------------------------------------------------

def expand(paths: Iterable[str | Path]) -> list[Path]:
    """Files as given (whatever their name: a bad one fails on its own line) and image files under folders,
    recursively, in sorted order; duplicates once."""
    out: dict[Path, None] = {}
    for p in map(Path, paths):
        if p.is_dir():
            out.update(dict.fromkeys(sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTS
                                            and f.is_file() and not f.name.startswith("."))))
        else:
            out[p] = None
    return list(out)


def photo_inputs(sources: Iterable[str | Path | PhotoInput], group_by: str = "none") -> list[PhotoInput]:
    """Paths (folders expanded as `expand` does) and PhotoInputs, as PhotoInputs in order. `group_by="folder"`
    makes each path's folder its item; PhotoInputs keep their own item."""
    out, paths = [], []

    def flush():
        for f in expand(paths):
            out.append(PhotoInput(str(f), item=str(f.parent) if group_by == "folder" else None))
        paths.clear()

    for src in sources:
        if isinstance(src, PhotoInput):
            flush()
            out.append(src)
        else:
            paths.append(src)
    flush()
    return out


class _Photos:
    """What training's PhotoDataset does for an original photo (numpy preprocessing, the same numbers: hsflow.core.images),
    with failures returned instead of raised so one bad file never stops a batch. A map-style dataset: a torch
    DataLoader decodes it in workers when there are several batches and workers to use."""

    def __init__(self, photos: list[PhotoInput], preprocess, draft_size: int | None):
        self.photos, self.preprocess, self.draft = photos, preprocess, draft_size

    def __len__(self):
        return len(self.photos)

    def __getitem__(self, i):
        src = self.photos[i]
        if src.error:
            return i, None, src.error
        try:
            img = open_rgb(src.name if src.data is None else src.data, name=src.name, draft_size=self.draft)
            return i, self.preprocess(img), None
        except PhotoError as exc:
            return i, None, str(exc)
        except Exception as exc:  # noqa: BLE001 - a decoder bug on one odd file must not end the batch
            return i, None, str(PhotoError(src.name, f"cannot process ({type(exc).__name__}: {exc})"))


def _collate(items):
    ok = [(i, x) for i, x, _ in items if x is not None]
    batch = np.stack([x for _, x in ok]) if ok else None
    return [i for i, _ in ok], batch, [(i, e) for i, _, e in items if e is not None]


def _batches(dataset: _Photos, batch_size: int, workers: int, device: str):
    """(indices, batch, errors) per batch: decoded in this process, or by a torch DataLoader's `workers`."""
    if workers == 0:
        for start in range(0, len(dataset), batch_size):
            yield _collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        return
    from torch.utils.data import DataLoader

    yield from DataLoader(dataset, batch_size=batch_size, collate_fn=_collate, num_workers=workers,
                          pin_memory=device.startswith("cuda"))


def _device(device: str | None) -> str:
    """The device asked for, else CUDA when torch is installed and sees one, else the CPU."""
    if device:
        return device
    try:
        import torch
    except ImportError:
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def predict(model: HSModel, photos: list[PhotoInput | Path], *, batch_size: int = 32,
            num_workers: int | None = None, device: str | None = None, progress: bool | None = None
            ) -> Iterator[tuple[PhotoInput, np.ndarray | None, np.ndarray | None, float | None, str | None]]:
    """(photo, calibrated probabilities, embedding, unknown score, error) per photo, in order, streamed batch by
    batch; the arrays (float32 numpy) are None for a photo that failed, the error None for one that did not, the
    score None for a model without a scorer."""
    photos = [p if isinstance(p, PhotoInput) else PhotoInput(str(p)) for p in photos]
    device = _device(device)
    # torch answers (a GPU, HSFLOW_RUNTIME=torch): on `device`, as features.extract runs. Not when ONNX Runtime does:
    # walking the network's modules to place them cost ~30 ms a request in make serve.
    if model.net is not None and not model.through_onnx(device):
        import torch

        model.net.to(device).eval().to(memory_format=torch.channels_last)
    batches = math.ceil(len(photos) / batch_size)
    if num_workers is None and batches > 1:
        from hsflow.data.loading import default_workers

        num_workers = default_workers(device)
    workers = min(num_workers or 0, batches) if batches > 1 else 0
    dataset = _Photos(photos, model.preprocess_array, model.meta["preprocess"]["resize"])
    disable = (len(photos) < PROGRESS_MIN or None) if progress is None else not progress  # None: only on a TTY
    with tqdm(total=len(photos), desc="recommend", unit="photo", disable=disable, file=sys.stderr) as bar:
        for idx, x, errors in _batches(dataset, batch_size, workers, device):
            out: dict[int, tuple] = {i: (None, None, None, e) for i, e in errors}
            if x is not None:
                probs, emb, logits = model.answer_arrays(x, device)
                scores = model.unknown_scores(emb, logits)
                scores = [None] * len(idx) if scores is None else scores.tolist()
                out.update({i: (p, e, s, None) for i, p, e, s in zip(idx, probs, emb, scores)})
            for i in sorted(out):
                yield photos[i], *out[i]
            bar.update(len(out))


# --- recommendations ---------------------------------------------------------------------------------------------

def candidates(probs: np.ndarray, classes: list[str], top_k: int) -> list[dict]:
    index = np.argsort(-probs, kind="stable")[:min(top_k, len(classes))]
    out = []
    for p, i in zip(probs[index].tolist(), index.tolist()):
        info = hs.describe(classes[i])
        out.append({"hs_code": info.hs_code, "probability": p, "description": info.description,
                    "heading": info.heading, "chapter": info.chapter})
    return out


def full_rollup(probs: np.ndarray, classes: list[str]) -> dict:
    by_code = dict(zip(classes, probs.tolist()))
    return {"chapters": hs.chapters(by_code), "headings": hs.headings(by_code)}


def is_unknown(model: HSModel, unknown_score: float | None) -> bool:
    """The unknown decision every door takes (CLI, Python, the MLflow model): the model's own scorer and threshold."""
    return model.unknown is not None and unknown_score is not None and bool(model.unknown.decide(unknown_score))


def _recommendation(image: str, probs: np.ndarray, emb: np.ndarray, model: HSModel, top_k: int,
                    n_precedents: int | None, images=None, group_key: str = "folder",
                    unknown_score: float | None = None) -> Recommendation:
    roll = full_rollup(probs, model.classes)
    top = {level: dict(list(sums.items())[:top_k]) for level, sums in roll.items()}
    threshold = float(model.meta.get("review_threshold", 0.0))
    unknown = is_unknown(model, unknown_score)
    cands = [{**c, "nearest_only": unknown} for c in candidates(probs, model.classes, top_k)]
    verdict = outcome(float(probs.max()), threshold, unknown)
    rec = Recommendation(image, cands, top, verdict != ANSWER, images=images, totals=roll, group_key=group_key,
                         outcome=verdict,
                         unknown=unknown, unknown_score=unknown_score,
                         unknown_threshold=model.unknown.threshold if model.unknown else None)
    index = model.precedents
    if index is not None and n_precedents != 0:
        sims = index.similarities(emb[None])
        rec.precedents = index.nearest(emb[None], n_precedents, sims)[0]
        nearest = index.nearest_label(emb[None], sims)[0]  # the class the nearest ruling trained as
        rec.precedent_agrees = nearest == model.classes[int(probs.argmax())]
    return rec


def _failed(image: str, error: str, images=None, group_key: str = "folder") -> Recommendation:
    return Recommendation(image, [], {}, True, error, images, group_key=group_key)


def recommend(model: HSModel | str, paths: Iterable[str | Path | PhotoInput], top_k: int = 5, *,
              group_by: str = "none", batch_size: int = 32, num_workers: int | None = None,
              device: str | None = None, progress: bool | None = None,
              precedents: int | None = None) -> list[Recommendation]:
    """Recommendations for photo files and folders (recursively) or PhotoInputs (bytes), in input order.

    `group_by="folder"`: one per folder, from the mean of its photos' probabilities (each photo counts equally;
    the mean of calibrated probabilities stays a distribution) and the mean of their unknown scores against the same
    threshold, after one failed-photo record per unreadable photo. PhotoInputs with an `item` are grouped the same
    way by item. `precedents`: how many precedent rulings to list (default: the model's own setting; 0: none).
    `model` is an HSModel or a URI for `load`; its network moves to `device` (default: CUDA when available).
    """
    return list(iter_recommend(model, paths, top_k, group_by=group_by, batch_size=batch_size,
                               num_workers=num_workers, device=device, progress=progress, precedents=precedents))


def answering(model: HSModel) -> dict:
    """Which model answers: its training run and, when loaded as a registered version, its name, version and the
    aliases it had then (`champion`...): in every answer, so a broker's record says which version gave it."""
    src = model.source or {}
    return {"run_id": model.meta.get("run_id"), "registered_model": src.get("registered_model"),
            "version": src.get("version"), "aliases": src.get("aliases", [])}


def iter_recommend(model: HSModel | str, paths: Iterable[str | Path | PhotoInput], top_k: int = 5, *,
                   group_by: str = "none", batch_size: int = 32, num_workers: int | None = None,
                   device: str | None = None, progress: bool | None = None,
                   precedents: int | None = None) -> Iterator[Recommendation]:
    """`recommend`, streamed: single photos' results come as each batch finishes, groups at the end.

    The one path from photos to answers: the CLI, the MLflow model (REST) and the review page all call it.
    """
    if group_by not in ("none", "folder"):
        raise ValueError(f"group_by={group_by!r}: choose none or folder")
    if top_k < 1:
        raise ValueError(f"top_k={top_k}: must be at least 1")
    model = load(model) if isinstance(model, str) else model
    who = answering(model)
    for rec in _answers(model, paths, top_k, group_by, batch_size, num_workers, device, progress, precedents):
        rec.model = who
        yield rec


def _answers(model: HSModel, paths, top_k, group_by, batch_size, num_workers, device, progress, precedents):
    photos = photo_inputs(paths, group_by)
    key = "folder" if group_by == "folder" else "item"
    stream = predict(model, photos, batch_size=batch_size, num_workers=num_workers, device=device,
                     progress=progress)
    groups: dict[str, list[tuple[str, np.ndarray, np.ndarray, float | None]]] = {}
    for src, probs, emb, score, error in stream:
        if src.item is not None:
            groups.setdefault(src.item, [])
        if probs is None:
            yield _failed(src.name, error)
            continue
        if src.item is None:
            yield _recommendation(src.name, probs, emb, model, top_k, precedents, unknown_score=score)
        else:
            groups[src.item].append((src.name, probs, emb, score))
    for item, members in groups.items():
        yield group_answer(model, item, members, top_k, precedents, key)


def group_answer(model: HSModel, item: str, members: list[tuple[str, np.ndarray, np.ndarray, float | None]],
                 top_k: int, precedents: int | None, key: str = "item") -> Recommendation:
    """One recommendation for an item's usable photos, (name, probabilities, embedding, unknown score) each: the
    mean of their probabilities, their precedents from the mean of their normalized embeddings. The CLI's groups
    and hsflow.score's (grouped in Spark after scoring, through the MLflow model) both come from here."""
    if not members:
        return _failed(item, f"{item}: no usable photo in this {key}", images=[], group_key=key)
    mean = np.stack([m[1] for m in members]).mean(0)
    emb = normalize(np.stack([m[2] for m in members])).mean(0)
    scores = [m[3] for m in members if m[3] is not None]  # an item is unknown when its photos are, on average
    return _recommendation(item, mean, emb, model, top_k, precedents, images=[m[0] for m in members],
                           group_key=key, unknown_score=sum(scores) / len(scores) if scores else None)


# --- grouping after scoring (hsflow.score in Spark: one row a photo through the model, then one a group) -----------

def _pack(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a, dtype=np.float32).tobytes()).decode("ascii")


def _unpack(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype=np.float32)


def iter_parts(model: HSModel, photos: Iterable[str | Path | PhotoInput], batch_size: int = 32) -> Iterator[str]:
    """Per photo, a JSON line of what its group's answer needs: {image, error: null, probabilities, embedding
    (float32, base64), unknown_score}; a photo that failed, its answer as `to_json` writes it (its `error` set)."""
    who = answering(model)
    for src, probs, emb, score, error in predict(model, photo_inputs(photos), batch_size=batch_size, num_workers=0,
                                                 progress=False):
        if probs is None:
            rec = _failed(src.name, error)
            rec.model = who
            yield to_json(rec)
        else:
            yield json.dumps({"image": src.name, "error": None, "probabilities": _pack(probs),
                              "embedding": _pack(emb), "unknown_score": score})


def answer_groups(model: HSModel, groups: Iterable[tuple[str, str]], top_k: int = 5, precedents: int | None = None,
                  key: str = "item") -> Iterator[Recommendation]:
    """(item, JSON list of its photos' `iter_parts` lines) -> the item's recommendation, as `--group-by` answers it
    (its failed photos are left out: they were answered on their own)."""
    who = answering(model)
    for item, parts in groups:
        members = [(m["image"], _unpack(m["probabilities"]), _unpack(m["embedding"]), m["unknown_score"])
                   for m in json.loads(parts) if not m.get("error")]
        rec = group_answer(model, item, members, top_k, precedents, key)
        rec.model = who
        yield rec


# --- output ------------------------------------------------------------------------------------------------------

def as_json(rec: Recommendation) -> dict:
    """The JSON object of one recommendation, probabilities to 6 decimals: what `--format json` prints a line of,
    the MLflow model returns per row and the review page shows. Fields added to `to_dict` flow through as they are."""
    d = rec.to_dict()
    d["candidates"] = [{**c, "probability": round(c["probability"], 6)} for c in d["candidates"]]
    if d["unknown_score"] is not None:
        d["unknown_score"] = round(d["unknown_score"], 6)
    d["rollup"] = {level: {k: round(v, 6) for k, v in sums.items()} for level, sums in d["rollup"].items()}
    return d


def to_json(rec: Recommendation) -> str:
    return json.dumps(as_json(rec), ensure_ascii=False)


def _clip(text: str | None, width: int) -> str:
    text = text or ""
    return text if len(text) <= width else text[: width - 3] + "..."


def to_table(rec: Recommendation) -> str:
    """A block per photo (or folder): each code with its probability and, beside it, its chapter's and heading's
    rolled-up probability; the top code's heading and chapter described below."""
    sums = rec.totals or rec.rollup
    title = rec.image + (f"  ({len(rec.images)} photos, mean probabilities)" if rec.images is not None else "")
    lines = [title + (f"  {UNKNOWN_MARK}" if rec.unknown else "") + ("  [NEEDS REVIEW]" if rec.needs_review else "")]
    if rec.unknown:
        lines.append(f"      unknown score {rec.unknown_score:.3f} > {rec.unknown_threshold:.3f}: the codes below are "
                     "only the nearest trained ones, not a suggestion")
    for n, c in enumerate(rec.candidates, 1):
        code = c["hs_code"]
        beside = f"chapter {code[:2]}: {sums['chapters'].get(code[:2], 0.0):.2f}"
        if not hs.is_catch_all(code):
            beside += f"; heading {code[:4]}: {sums['headings'].get(code[:4], 0.0):.2f}"
        lines.append(f"  {n:>2}. {hs.display(code)}  {c['probability']:.3f}  {beside:<34}  "
                     f"{_clip(c['description'], 70)}")
    if rec.candidates:
        top = rec.candidates[0]["hs_code"]
        info = hs.describe(top)
        where = [f"heading {top[:4]}: {_clip(info.heading, 60)}"] if info.heading else []
        where.append(f"chapter {top[:2]}: {_clip(info.chapter, 60)}")
        lines.append("      " + " | ".join(where))
    for n, p in enumerate(rec.precedents):
        flag = "  [DISAGREES with the top code]" if n == 0 and rec.precedent_agrees is False else ""
        lines.append(f"      precedent: ruling {p['rrdc_no']} ({p['date']}) decided {hs.display(p['hs_code'])}, "
                     f"similarity {p['similarity']:.2f}: {_clip(p['product'], 50)}{flag}")
    return "\n".join(lines)


def default_model(name: str | None) -> str | None:
    """The model every door answers with when none is named (hsflow.serving.registry.default_model_uri: the registered
    model's champion, else the latest `make train` model), or None after one error line saying what to do."""
    from hsflow.serving.registry import default_model_uri

    try:
        return default_model_uri(name, tracking_uri=tracking_uri())
    except LookupError as exc:
        print(f"error: no --model given and {exc}; or pass --model runs:/<run id>/model (or a folder)",
              file=sys.stderr)
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hsflow.recommend", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="runs:/<run id>/model, models:/<name>/<version>, "
                    "models:/<name>@<alias> or a folder (default: the registered model's champion, else the "
                    "latest `make train` model)")
    ap.add_argument("--registered-model", default=None, metavar="NAME",
                    help="whose champion answers when --model is not given (default: hsflow)")
    ap.add_argument("--top-k", type=int, default=5)
    ap.add_argument("--format", choices=("table", "json"), default="table")
    ap.add_argument("--group-by", choices=("none", "folder"), default="none",
                    help="folder: one recommendation per folder from the mean of its photos' probabilities")
    ap.add_argument("--precedents", type=int, default=None, metavar="N",
                    help="precedent rulings to list per photo (default: the model's setting, 3; 0: none)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--num-workers", type=int, default=None,
                    help="decoding processes (default: cores - 1 on a GPU, none on a CPU of <= 4 cores)")
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    ap.add_argument("paths", nargs="+", metavar="PATH", help="photo files or folders (searched recursively)")
    args = ap.parse_args(argv)
    if args.top_k < 1 or args.batch_size < 1 or (args.num_workers or 0) < 0 or (args.precedents or 0) < 0:
        ap.error("--top-k and --batch-size must be at least 1, --num-workers and --precedents at least 0")
    files = expand(args.paths)
    if not files:
        print(f"error: no photos found in {' '.join(args.paths)}", file=sys.stderr)
        return 2
    args.model = args.model or default_model(args.registered_model)
    if args.model is None:
        return 2
    try:
        model = load(args.model)
    except Exception as exc:  # noqa: BLE001 - any failure to load is one line, never a traceback
        print(f"error: cannot load model {args.model!r}: {load_error(args.model, exc)}", file=sys.stderr)
        return 2

    failed = 0
    try:
        for rec in iter_recommend(model, files, args.top_k, group_by=args.group_by, batch_size=args.batch_size,
                                  num_workers=args.num_workers, device=args.device, precedents=args.precedents):
            if rec.error:
                failed += rec.images is None
                if args.format == "table":
                    print(f"error: {rec.error}", file=sys.stderr, flush=True)
            if args.format == "json":
                print(to_json(rec), flush=True)
            elif not rec.error:
                print(to_table(rec) + "\n", flush=True)
    except BrokenPipeError:  # the reader left (`| head`): stop quietly, as a Unix filter does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    if failed:
        print(f"{failed} of {len(files)} photos failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
