"""One generic builder turns the raw store into a dataset variant; the variant's parameters are config values.

Steps, in order: read the store's photos -> drop photos that do not decode (one warning line each) -> choose the
classes (chapter, the N largest codes, the rest relabelled to a catch-all code or dropped) -> split by ruling,
stratified per class, seeded -> optional generated copies (views) for training.

The split depends only on the store, the dataset config and the seed, never on the backbone or the epochs, so a
grid of models compares on the same photos.
"""
from __future__ import annotations

import collections
import hashlib
import json
import random
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from omegaconf import DictConfig
from tqdm import tqdm

from hsflow.images import PhotoError, open_rgb
from hsflow.store import Photo, RawStore

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Sample:
    path: str
    sha256: str
    rrdc_no: str
    label: int
    split: str
    view: int = 0  # 0 = the original photo, k > 0 = generated copy k


@dataclass
class DatasetSpec:
    name: str
    classes: list[str]
    samples: list[Sample]
    skipped: list[str] = field(default_factory=list)  # "path: reason" of photos left out

    def split(self, name: str, *, originals_only: bool = False) -> list[Sample]:
        return [s for s in self.samples if s.split == name and (s.view == 0 or not originals_only)]

    def counts(self) -> dict:
        """Photos per class per split (originals and generated copies separately): the dataset fingerprint."""
        out: dict = {sp: {} for sp in SPLITS}
        for s in self.samples:
            key = self.classes[s.label] + ("+generated" if s.view else "")
            out[s.split][key] = out[s.split].get(key, 0) + 1
        return {sp: dict(sorted(c.items())) for sp, c in out.items()}

    def fingerprint(self) -> str:
        rows = sorted((s.sha256, s.view, s.split, self.classes[s.label]) for s in self.samples)
        return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]

    def save_split(self, path: Path) -> None:
        """The split as CSV (one row per sample), logged with every run."""
        import csv

        with path.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["split", "hs_code", "rrdc_no", "view", "sha256", "path"])
            for s in sorted(self.samples, key=lambda s: (s.split, s.label, s.rrdc_no, s.path, s.view)):
                w.writerow([s.split, self.classes[s.label], s.rrdc_no, s.view, s.sha256, s.path])


def usable_photos(store: RawStore, verbose: bool = True) -> tuple[list[Photo], list[str]]:
    """All photos of the store that decode; the others are reported once, here, never inside a DataLoader."""
    good, bad = [], []
    photos = list(store.photos())
    for p in tqdm(photos, desc="check photos", unit="photo", disable=not verbose, leave=False):
        try:
            open_rgb(p.path, draft_size=64)
            good.append(p)
        except PhotoError as exc:
            bad.append(str(exc))
            print(f"warning: skipping photo {exc} (ruling {p.rrdc_no}); fix or remove it from the store",
                  file=sys.stderr)
    return good, bad


def select_classes(photos: list[Photo], cfg: DictConfig) -> dict[str, str]:
    """code -> class label, following dataset.chapter / dataset.top_codes / dataset.other_code."""
    counts = collections.Counter(p.hs_code for p in photos
                                 if not cfg.get("chapter") or p.hs_code.startswith(str(cfg.chapter)))
    if not counts:
        raise ValueError(f"dataset {cfg.name}: no photos left after dataset.chapter={cfg.get('chapter')!r}")
    ranked = sorted(counts, key=lambda c: (-counts[c], c))
    keep = ranked[: cfg.top_codes] if cfg.get("top_codes") else ranked
    mapping = {c: c for c in keep}
    if cfg.get("other_code"):
        mapping.update({c: str(cfg.other_code) for c in ranked if c not in mapping})
    return mapping


def split_by_ruling(groups: dict[str, list[Photo]], fractions: dict[str, float], seed: int,
                    label: str) -> dict[str, str]:
    """Assign whole rulings (groups) to splits so each split's photo count approaches its fraction.

    Rulings are shuffled with a seed derived from the class label, then each goes to the split with the largest
    deficit; the largest ruling-first order keeps small classes from ending up with an empty split.
    """
    rng = random.Random(f"{seed}:{label}")
    keys = sorted(groups)
    rng.shuffle(keys)
    keys.sort(key=lambda k: -len(groups[k]))  # stable: shuffled among equal sizes
    total = sum(len(v) for v in groups.values())
    have = {s: 0 for s in fractions}
    out = {}
    for k in keys:
        target = max(fractions, key=lambda s: (fractions[s] * total - have[s], fractions[s]))
        out[k] = target
        have[target] += len(groups[k])
    return out


def build_dataset(cfg: DictConfig, store_path: str | Path, *, verbose: bool = True) -> DatasetSpec:
    store = RawStore(store_path)
    photos, skipped = usable_photos(store, verbose)
    mapping = select_classes(photos, cfg)
    classes = sorted(set(mapping.values()))
    index = {c: i for i, c in enumerate(classes)}
    fractions = {s: float(cfg.split[s]) for s in SPLITS}
    if abs(sum(fractions.values()) - 1) > 1e-6 or min(fractions.values()) < 0:
        raise ValueError(f"dataset.split fractions must be >= 0 and sum to 1, got {fractions}")

    by_class: dict[str, dict[str, list[Photo]]] = collections.defaultdict(lambda: collections.defaultdict(list))
    for p in photos:
        if p.hs_code in mapping:
            by_class[mapping[p.hs_code]][p.rrdc_no].append(p)

    samples: list[Sample] = []
    train_views = int(cfg.get("train_views", 0) or 0)
    for label in classes:
        assignment = split_by_ruling(by_class[label], fractions, int(cfg.split.seed), label)
        for rrdc, group in sorted(by_class[label].items()):
            split = assignment[rrdc]
            for p in sorted(group, key=lambda p: p.file):
                samples.append(Sample(str(p.path), p.sha256, rrdc, index[label], split))
                if split == "train":
                    samples.extend(Sample(str(p.path), p.sha256, rrdc, index[label], split, v)
                                   for v in range(1, train_views + 1))
    return DatasetSpec(str(cfg.name), classes, samples, skipped)


def spec_summary(spec: DatasetSpec) -> dict:
    return {"name": spec.name, "classes": len(spec.classes), "fingerprint": spec.fingerprint(),
            "photos": {sp: len(spec.split(sp, originals_only=True)) for sp in SPLITS},
            "generated": {sp: len(spec.split(sp)) - len(spec.split(sp, originals_only=True)) for sp in SPLITS},
            "skipped_photos": len(spec.skipped)}


__all__ = ["Sample", "DatasetSpec", "build_dataset", "spec_summary", "asdict"]
