"""One generic builder turns the raw store into a dataset variant; the variant's parameters are config values.

Steps, in order: read the store's photos (of one chapter, if asked) -> drop photos that do not decode (one warning
line each) -> the quality rules (size, blur, near-duplicates; hsflow.data.quality) -> choose the classes (the N
largest codes, the rest relabelled to a catch-all code or dropped) -> split by ruling (rulings linked by
near-duplicate photos move together), stratified per class, seeded (`split.by: ruling`, the study's protocol), or
by the rulings' dates (`split.by: date`: before the first cut trains, then validation, then test: what a user
meets when new imports arrive) -> per-class caps on originals -> generated copies (views) to fill training to a
per-class size (and, only when asked, the test split: the study's protocol).

The split depends only on the store, the dataset config and the seed, never on the backbone or the epochs, so a
grid of models compares on the same photos.
"""
from __future__ import annotations

import collections
import hashlib
import json
import random
import re
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from omegaconf import DictConfig
from tqdm import tqdm

from hsflow.data import quality
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
    removed: dict = field(default_factory=dict)  # photos removed per rule (undecodable, quality filter)
    near_duplicates: list[list[str]] = field(default_factory=list)  # clusters kept on one side of the split
    protocol: str = ""  # how the split was drawn (builder.protocol): reported beside every figure

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


def usable_photos(photos: list[Photo], verbose: bool = True) -> tuple[list[Photo], list[str]]:
    """The photos that decode; the others are reported once, here, never inside a DataLoader."""
    good, bad = [], []
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


def split_by_date(groups: dict[str, list[Photo]], cuts: list[str]) -> dict[str, str]:
    """Assign whole split units by date: before cuts[0] trains, [cuts[0], cuts[1]) validates, from cuts[1] tests.

    A unit (rulings linked by near-duplicate photos) goes where its latest ruling falls, so no ruling dated after
    a cut ever reaches the training side (an earlier look-alike moves forward instead)."""
    out = {}
    for key, photos in groups.items():
        latest = max(p.date for p in photos)
        out[key] = "train" if latest < cuts[0] else "val" if latest < cuts[1] else "test"
    return out


def _date_cuts(cfg: DictConfig) -> list[str]:
    cuts = [str(c) for c in (cfg.split.get("cuts") or [])]
    import re

    if len(cuts) != 2 or not all(re.fullmatch(r"\d{4}-\d{2}-\d{2}", c) for c in cuts) or cuts[0] >= cuts[1]:
        raise ValueError(f"dataset.split.cuts={cuts}: give two dates YYYY-MM-DD, in order (train before the first, "
                         "validation until the second, test from it), e.g. [2018-01-01, 2019-01-01]")
    return cuts


def _groups(photos: list[Photo], clusters: list[list[str]]) -> dict[str, list[Photo]]:
    """Split units: rulings, merged when a near-duplicate cluster links them, so neither straddles the line."""
    parent: dict[str, str] = {p.rrdc_no: p.rrdc_no for p in photos}

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    ruling_of = {p.file: p.rrdc_no for p in photos}
    for cluster in clusters:
        roots = sorted({find(ruling_of[f]) for f in cluster if f in ruling_of})
        for r in roots[1:]:
            parent[r] = roots[0]
    out: dict[str, list[Photo]] = collections.defaultdict(list)
    for p in photos:
        out[find(p.rrdc_no)].append(p)
    return out


def _cap(photos: list[Photo], cap, rng: random.Random) -> list[Photo]:
    """At most `cap` photos, taken whole rulings at a time in a seeded order (the last one may be cut)."""
    if cap is None or len(photos) <= int(cap):
        return photos
    by_ruling = collections.defaultdict(list)
    for p in photos:
        by_ruling[p.rrdc_no].append(p)
    order = sorted(by_ruling)
    rng.shuffle(order)
    taken = [p for r in order for p in by_ruling[r]]
    return taken[: int(cap)]


def _fill(originals: list[Sample], target, first_view: int = 1) -> list[Sample]:
    """Generated copies that bring `originals` up to `target` items, spread evenly over the originals."""
    if not target or not originals or len(originals) >= int(target):
        return []
    n = len(originals)
    return [replace(originals[i % n], view=first_view + i // n) for i in range(int(target) - n)]


def build_dataset(cfg: DictConfig, store_path: str | Path, *, cache_dir: str | Path | None = None,
                  verbose: bool = True) -> DatasetSpec:
    store = RawStore(store_path)
    chapter = str(cfg.chapter) if cfg.get("chapter") else None
    by = str(cfg.split.get("by", "ruling"))
    if by not in ("ruling", "date"):
        raise ValueError(f"dataset.split.by={by!r}: choose ruling (random by ruling, seeded) or date (cut dates)")
    cuts = _date_cuts(cfg) if by == "date" else None
    excluded = excluded_codes(cfg)
    photos = [p for p in store.photos() if (not chapter or p.hs_code.startswith(chapter))
              and p.hs_code not in excluded]
    if cuts:  # checked before any photo is decoded: a period with no ruling is a config error, not a result
        check_periods(photos, cuts, cfg)
    photos, skipped = usable_photos(photos, verbose)
    photos, removed, clusters = quality.apply(photos, cfg.get("quality"), cache_dir, verbose)
    removed = {"undecodable": len(skipped), **removed}
    mapping = select_classes(photos, cfg)
    classes = sorted(set(mapping.values()))
    index = {c: i for i, c in enumerate(classes)}
    fractions = {s: float(cfg.split[s]) for s in SPLITS}
    if by == "ruling" and abs(sum(fractions.values()) - 1) > 1e-6 or min(fractions.values()) < 0:
        raise ValueError(f"dataset.split fractions must be >= 0 and sum to 1, got {fractions}")
    caps = cfg.get("per_class") or {}
    fill = cfg.get("fill") or {}
    train_views = int(cfg.get("train_views", 0) or 0)
    fill_test = bool(cfg.get("test_fill_with_generated", False))

    by_class: dict[str, list[Photo]] = collections.defaultdict(list)
    for p in photos:
        if p.hs_code in mapping:
            by_class[mapping[p.hs_code]].append(p)

    samples: list[Sample] = []
    for label in classes:
        groups = _groups(by_class[label], clusters)
        assignment = (split_by_date(groups, cuts) if cuts
                      else split_by_ruling(groups, fractions, int(cfg.split.seed), label))
        rng = random.Random(f"{cfg.split.seed}:{label}:cap")
        for split in SPLITS:
            chosen = sorted((p for g, ps in groups.items() if assignment[g] == split for p in ps),
                            key=lambda p: (p.rrdc_no, p.file))
            cap = caps.get(split)
            if split == "train" and fill.get("train"):  # a fill target is also the class's training size
                cap = min(int(cap), int(fill.train)) if cap is not None else fill.train
            originals = [Sample(str(p.path), p.sha256, p.rrdc_no, index[label], split)
                         for p in sorted(_cap(chosen, cap, rng), key=lambda p: (p.rrdc_no, p.file))]
            samples.extend(originals)
            if split == "train":
                samples.extend(replace(s, view=v) for s in originals for v in range(1, train_views + 1))
                samples.extend(_fill(originals, fill.get("train"), first_view=train_views + 1))
            elif split == "test" and fill_test:
                if not fill.get("test"):
                    raise ValueError("dataset.test_fill_with_generated=true needs dataset.fill.test (per-class size)")
                samples.extend(_fill(originals, fill.test))
    spec = DatasetSpec(str(cfg.name), classes, samples, skipped, removed, clusters, protocol=protocol(cfg))
    if cuts:
        spec = _drop_untrained_classes(spec)
    return spec


def excluded_codes(cfg: DictConfig) -> set[str]:
    """dataset.exclude_codes: codes held out entirely (no photo in any split), e.g. to measure how a model meets
    codes it has never seen (hsflow.unknown's leave-codes-out evaluation)."""
    codes = [str(c) for c in (cfg.get("exclude_codes") or [])]
    bad = [c for c in codes if not re.fullmatch(r"\d{10}", c)]
    if bad:
        raise ValueError(f"dataset.exclude_codes: {bad[0]!r} is not a 10-digit HS code (e.g. "
                         "'dataset.exclude_codes=[\"0810500000\"]')")
    return set(codes)


def protocol(cfg: DictConfig) -> str:
    """How the splits were drawn, in words a report can show: 'date<2018-01-01|<2019-01-01' or 'ruling(seed 42)'."""
    if str(cfg.split.get("by", "ruling")) == "date":
        a, b = _date_cuts(cfg)
        return f"date: train<{a}, val<{b}, test>={b}"
    return f"ruling: random {cfg.split.train:g}/{cfg.split.val:g}/{cfg.split.test:g}, seed {cfg.split.seed}"


def check_periods(photos: list[Photo], cuts: list[str], cfg: DictConfig) -> None:
    """One clear line when a cut leaves a period without rulings (or rulings carry no date)."""
    undated = sorted({p.rrdc_no for p in photos if not p.date})
    if undated:
        raise ValueError(f"dataset {cfg.name}: split.by=date but {len(undated)} rulings have no ENFR_DT date "
                         f"(e.g. {undated[0]}); use dataset.split.by=ruling for this store")
    dates = sorted(p.date for p in photos)
    if not dates:
        return
    periods = {"train": [d for d in dates if d < cuts[0]], "val": [d for d in dates if cuts[0] <= d < cuts[1]],
               "test": [d for d in dates if d >= cuts[1]]}
    empty = [sp for sp, ds in periods.items() if not ds]
    if empty:
        raise ValueError(f"dataset {cfg.name}: split cuts {cuts} leave the {' and '.join(empty)} period empty "
                         f"(rulings dated {dates[0]} .. {dates[-1]}); move dataset.split.cuts inside that range")


def _drop_untrained_classes(spec: DatasetSpec) -> DatasetSpec:
    """With a dated split a code may first appear after the training period: it cannot be learned, so it is not a
    class (its later photos are left out, counted under removed['no_training_photos'])."""
    trained = sorted({s.label for s in spec.samples if s.split == "train"})
    if len(trained) == len(spec.classes):
        return spec
    new = {old: i for i, old in enumerate(trained)}
    lost = [s for s in spec.samples if s.label not in new]
    for code in sorted({spec.classes[s.label] for s in lost}):
        print(f"warning: dataset {spec.name}: code {code} has no ruling before the first cut; not a class "
              f"({sum(spec.classes[s.label] == code for s in lost)} later photos left out)", file=sys.stderr)
    return replace(spec, classes=[spec.classes[i] for i in trained],
                   samples=[replace(s, label=new[s.label]) for s in spec.samples if s.label in new],
                   removed={**spec.removed, "no_training_photos": len(lost)})


def spec_summary(spec: DatasetSpec) -> dict:
    return {"name": spec.name, "protocol": spec.protocol, "classes": len(spec.classes),
            "fingerprint": spec.fingerprint(),
            "photos": {sp: len(spec.split(sp, originals_only=True)) for sp in SPLITS},
            "generated": {sp: len(spec.split(sp)) - len(spec.split(sp, originals_only=True)) for sp in SPLITS},
            "skipped_photos": len(spec.skipped), "removed": spec.removed,
            "near_duplicate_clusters": len(spec.near_duplicates)}


__all__ = ["Sample", "DatasetSpec", "build_dataset", "spec_summary", "asdict"]
