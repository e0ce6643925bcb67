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
from hsflow.core.images import PhotoError, open_rgb
from hsflow.data.store import Photo, RawStore

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
    codes: dict = field(default_factory=dict)  # code -> {"fate", "reason", ...} for every code not a class as is
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


def select_classes(photos: list[Photo], cfg: DictConfig, fates: dict | None = None) -> dict[str, str]:
    """code -> class label, following dataset.chapter / top_codes / other_code and the long-tail policy
    (dataset.long_tail.min_rulings / rare); each code that is not its own class gets an entry in `fates`."""
    fates = {} if fates is None else fates
    counts = collections.Counter(p.hs_code for p in photos
                                 if not cfg.get("chapter") or p.hs_code.startswith(str(cfg.chapter)))
    if not counts:
        raise ValueError(f"dataset {cfg.name}: no photos left after dataset.chapter={cfg.get('chapter')!r}")
    rulings = collections.defaultdict(set)
    for p in photos:
        rulings[p.hs_code].add(p.rrdc_no)
    lt = cfg.get("long_tail") or {}
    min_rulings, rare = int(lt.get("min_rulings") or 1), str(lt.get("rare") or "other")
    if rare not in ("other", "drop"):
        raise ValueError(f"dataset.long_tail.rare={rare!r}: choose other (the chapter's catch-all code "
                         "<chapter>99999999) or drop")
    ranked = sorted(counts, key=lambda c: (-counts[c], c))
    keep = ranked[: cfg.top_codes] if cfg.get("top_codes") else ranked
    mapping = {}
    for c in keep:
        n = len(rulings[c])
        if n >= min_rulings:
            mapping[c] = c
        elif rare == "other":
            mapping[c] = catch_all(c)
            fates[c] = {**fates.get(c, {}), "fate": "catch_all", "reason": f"{n} ruling(s) < long_tail.min_rulings {min_rulings}: "
                        f"relabelled {mapping[c]}", "photos": counts[c]}
        else:
            fates[c] = {**fates.get(c, {}), "fate": "dropped", "reason": f"{n} ruling(s) < long_tail.min_rulings {min_rulings}",
                        "photos": counts[c]}
    if cfg.get("other_code"):
        for c in ranked:
            if c not in keep:
                mapping[c] = str(cfg.other_code)
                fates[c] = {"fate": "catch_all", "reason": f"not among the top {cfg.top_codes} codes: relabelled "
                            f"{cfg.other_code}", "photos": counts[c]}
    elif cfg.get("top_codes"):
        fates.update({c: {"fate": "dropped", "reason": f"not among the top {cfg.top_codes} codes",
                          "photos": counts[c]} for c in ranked if c not in keep})
    return mapping


def catch_all(code: str) -> str:
    """The chapter's catch-all class (as the study's 8799999999): every code of the chapter too rare to learn."""
    return f"{code[:2]}99999999"


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
    """Split units: rulings, merged when a near-duplicate cluster links them, so neither straddles the line.
    `clusters` need only be those touching `photos` (the builder passes each class its own)."""
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


# Fetches rulings of any chapter from the portal (README "Crawl rulings from the portal").
CRAWL_COMMAND = ("cd crawler && scrapy crawl clip_rulings -s RAW_STORE=../data/raw -s CLIP_CONTACT=you@example.org")


def selected_photos(cfg: DictConfig, store: RawStore) -> list[Photo]:
    """The store's photos the variant selects (its chapter), read from the ruling records alone: no photo is
    decoded. A selection of nothing fails here, in a second, with what to do about it (one line)."""
    chapter = str(cfg.chapter) if cfg.get("chapter") else None
    photos = [p for p in store.photos() if not chapter or p.hs_code.startswith(chapter)]
    if photos:
        return photos
    chapters = sorted({p.hs_code[:2] for p in store.photos()})
    what = f"no ruling of chapter {chapter}" if chapter else "no ruling with photos"
    held = f" (it holds chapters {', '.join(chapters)})" if chapters else ""
    twin = f"; or train its twin on the shipped demo now: dataset={cfg.demo_twin}" if cfg.get("demo_twin") else ""
    raise ValueError(f"dataset {cfg.name} selects no photos: the store {store.root} has {what}{held}. "
                     f"Crawl such rulings from the portal ({CRAWL_COMMAND}) and add paths.raw_store=data/raw{twin}")


def build_dataset(cfg: DictConfig, store_path: str | Path, *, cache_dir: str | Path | None = None,
                  verbose: bool = True) -> DatasetSpec:
    store = RawStore(store_path)
    by = str(cfg.split.get("by", "ruling"))
    if by not in ("ruling", "date"):
        raise ValueError(f"dataset.split.by={by!r}: choose ruling (random by ruling, seeded) or date (cut dates)")
    cuts = _date_cuts(cfg) if by == "date" else None
    excluded = excluded_codes(cfg)
    photos = [p for p in selected_photos(cfg, store) if p.hs_code not in excluded]
    all_codes = collections.Counter(p.hs_code for p in photos)
    if cuts:  # checked before any photo is decoded: a period with no ruling is a config error, not a result
        check_periods(photos, cuts, cfg)
    photos, skipped = usable_photos(photos, verbose)
    after_decode = collections.Counter(p.hs_code for p in photos)
    conflict_cost: collections.Counter = collections.Counter()
    photos, removed, clusters = quality.apply(photos, cfg.get("quality"), cache_dir, verbose, conflict_cost)
    removed = {"undecodable": len(skipped), **removed}
    fates = _quality_fates(all_codes, after_decode, collections.Counter(p.hs_code for p in photos), conflict_cost)
    mapping = select_classes(photos, cfg, fates)
    classes = sorted(set(mapping.values()))
    _check_split_values(cfg, by)
    by_class: dict[str, list[Photo]] = collections.defaultdict(list)
    for p in photos:
        if p.hs_code in mapping:
            by_class[mapping[p.hs_code]].append(p)
    class_of_file = {p.file: mapping.get(p.hs_code) for p in photos}
    clusters_of: dict[str, list[list[str]]] = collections.defaultdict(list)  # each cluster lies in one code
    for cluster in clusters:
        clusters_of[class_of_file.get(cluster[0])].append(cluster)
    samples: list[Sample] = []
    for i, label in enumerate(classes):
        samples.extend(_class_samples(cfg, i, label, _groups(by_class[label], clusters_of[label]), cuts, fates))
    spec = DatasetSpec(str(cfg.name), classes, samples, skipped, removed, clusters, protocol=protocol(cfg),
                       codes=fates)
    spec = _drop_untrained_classes(spec, cuts)
    if verbose:
        report_codes(spec, len(all_codes))
    return spec


def _check_split_values(cfg: DictConfig, by: str) -> None:
    fractions = {s: float(cfg.split[s]) for s in SPLITS}
    if by == "ruling" and abs(sum(fractions.values()) - 1) > 1e-6 or min(fractions.values()) < 0:
        raise ValueError(f"dataset.split fractions must be >= 0 and sum to 1, got {fractions}")
    singletons = str((cfg.get("long_tail") or {}).get("singletons") or "train")
    if singletons not in ("train", "drop"):
        raise ValueError(f"dataset.long_tail.singletons={singletons!r}: choose train (a code with one split unit "
                         "trains, never evaluated) or drop")


def _assign(cfg: DictConfig, label: str, groups: dict[str, list[Photo]], cuts: list[str] | None,
            fates: dict) -> dict[str, str]:
    """Each split unit (a ruling, or rulings linked by near-duplicates) of one class -> its split; records in
    `fates` a class that can only train (or is dropped) because it has a single unit."""
    singletons = str((cfg.get("long_tail") or {}).get("singletons") or "train")
    if cuts:
        assignment = split_by_date(groups, cuts)
        if len(groups) == 1 and all(v == "train" for v in assignment.values()):
            fates[label] = {"fate": "train_only", "reason": "singleton: its one split unit is dated before "
                            f"{cuts[0]}: trains, never evaluated", "photos": len(next(iter(groups.values())))}
        return assignment
    if len(groups) == 1:  # one ruling (or one near-duplicate unit): it cannot be both learned and tested
        unit = next(iter(groups))
        fates[label] = {"fate": "train_only" if singletons == "train" else "dropped",
                        "reason": f"singleton: one split unit ({len(groups[unit])} photos); "
                                  f"long_tail.singletons={singletons}", "photos": len(groups[unit])}
        return {unit: "train" if singletons == "train" else "dropped"}
    fractions = {s: float(cfg.split[s]) for s in SPLITS}
    return split_by_ruling(groups, fractions, int(cfg.split.seed), label)


def _class_samples(cfg: DictConfig, index: int, label: str, groups: dict[str, list[Photo]],
                   cuts: list[str] | None, fates: dict) -> list[Sample]:
    """One class's samples: its units split, each split capped per class, training (and, only when asked, test)
    filled with generated copies."""
    caps, fill = cfg.get("per_class") or {}, cfg.get("fill") or {}
    train_views = int(cfg.get("train_views", 0) or 0)
    assignment = _assign(cfg, label, groups, cuts, fates)
    rng = random.Random(f"{cfg.split.seed}:{label}:cap")
    samples: list[Sample] = []
    for split in SPLITS:
        chosen = sorted((p for g, ps in groups.items() if assignment[g] == split for p in ps),
                        key=lambda p: (p.rrdc_no, p.file))
        cap = caps.get(split)
        if split == "train" and fill.get("train"):  # a fill target is also the class's training size
            cap = min(int(cap), int(fill.train)) if cap is not None else fill.train
        originals = [Sample(str(p.path), p.sha256, p.rrdc_no, index, split)
                     for p in sorted(_cap(chosen, cap, rng), key=lambda p: (p.rrdc_no, p.file))]
        samples.extend(originals)
        if split == "train":
            samples.extend(replace(s, view=v) for s in originals for v in range(1, train_views + 1))
            samples.extend(_fill(originals, fill.get("train"), first_view=train_views + 1))
        elif split == "test" and bool(cfg.get("test_fill_with_generated", False)):
            if not fill.get("test"):
                raise ValueError("dataset.test_fill_with_generated=true needs dataset.fill.test (per-class size)")
            samples.extend(_fill(originals, fill.test))
    return samples


def _quality_fates(store_codes, decodable, kept, conflict_cost) -> dict:
    """Codes the decode check and the quality rules cost: lost entirely (dropped, with the rule) or in part."""
    fates = {}
    for code, n in sorted(store_codes.items()):
        if not decodable.get(code):
            fates[code] = {"fate": "dropped", "reason": f"all {n} photos undecodable", "photos": 0}
        elif not kept.get(code):
            rule = ("near-duplicate conflicts (look-alikes under another code)" if conflict_cost.get(code)
                    else "the quality rules (size, blur, near-duplicates)")
            fates[code] = {"fate": "dropped", "reason": f"all {decodable[code]} photos removed by {rule}",
                           "photos": 0}
    for code, n in conflict_cost.items():
        fates.setdefault(code, {"fate": "kept", "reason": "", "photos": kept.get(code, 0)})
        fates[code]["near_duplicate_conflict_photos"] = n
    return fates


NAMED = 40  # codes named per line in the summary; all of them are in the run's dataset/codes.json


def _names(codes: list[str]) -> str:
    more = f" ... and {len(codes) - NAMED} more (dataset/codes.json)" if len(codes) > NAMED else ""
    return ", ".join(codes[:NAMED]) + more


def report_codes(spec: DatasetSpec, store_codes: int) -> None:
    """What happened to codes that are not plain classes, one line per fate and reason, naming the codes."""
    by = collections.defaultdict(list)
    for code, f in sorted(spec.codes.items()):
        if f["fate"] != "kept":
            by[f["fate"], _reason_kind(f["reason"])].append(code)
    print(f"dataset {spec.name}: {store_codes} codes in the store -> {len(spec.classes)} classes", file=sys.stderr)
    for (fate, why), codes in sorted(by.items()):
        print(f"  {fate} ({why}): {len(codes)} codes: {_names(codes)}", file=sys.stderr)
    cost = {c: f["near_duplicate_conflict_photos"] for c, f in spec.codes.items()
            if f.get("near_duplicate_conflict_photos")}
    if cost:
        ranked = sorted(cost, key=lambda c: (-cost[c], c))
        print(f"  near-duplicate conflicts removed {sum(cost.values())} photos of {len(cost)} codes: "
              f"{_names([f'{c} ({cost[c]})' for c in ranked])}", file=sys.stderr)


def _reason_kind(reason: str) -> str:
    kinds = {"undecodable": "undecodable", "near-duplicate conflicts": "near-duplicate conflicts",
             "quality rules": "quality rules", "min_rulings": "fewer rulings than long_tail.min_rulings",
             "top ": "not among the top codes", "singleton": "singleton", "no ruling before": "no ruling before the "
             "first cut", "no training photo": "no training photo"}
    return next((v for k, v in kinds.items() if k in reason), reason)


def excluded_codes(cfg: DictConfig) -> set[str]:
    """dataset.exclude_codes: codes held out entirely (no photo in any split), e.g. to measure how a model meets
    codes it has never seen (hsflow.models.unknown's leave-codes-out evaluation)."""
    codes = [str(c) for c in (cfg.get("exclude_codes") or [])]
    bad = [c for c in codes if not re.fullmatch(r"\d{10}", c)]
    if bad:
        raise ValueError(f"dataset.exclude_codes: {bad[0]!r} is not a 10-digit HS code (e.g. "
                         "'dataset.exclude_codes=[\"0810500000\"]')")
    return set(codes)


def leave_codes_out(samples: list[Sample], classes: list[str], held) -> tuple[list[bool], list[bool], list[int]]:
    """Leave-codes-out over samples whose labels index `classes`: per sample, whether its code is trained (not in
    `held`), whether it is an original photo (view 0), and its label among the trained codes alone, in `classes`'
    order (-1 for a held-out code's photo): what a model trained without `held` would be taught."""
    held = set(held)
    relabel = {c: i for i, c in enumerate(c for c in classes if c not in held)}
    known = [classes[s.label] not in held for s in samples]
    return known, [s.view == 0 for s in samples], [relabel.get(classes[s.label], -1) for s in samples]


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


def _drop_untrained_classes(spec: DatasetSpec, cuts: list[str] | None) -> DatasetSpec:
    """A class without a training photo cannot be learned: with a dated split its first ruling came after the
    training period, with `long_tail.singletons=drop` its only unit was dropped. It is not a class; its photos are
    left out, counted under removed['no_training_photos'] and named in spec.codes."""
    trained = sorted({s.label for s in spec.samples if s.split == "train"})
    if len(trained) == len(spec.classes):
        return spec
    new = {old: i for i, old in enumerate(trained)}
    lost = collections.Counter(spec.classes[s.label] for s in spec.samples if s.label not in new)
    codes = dict(spec.codes)
    for i, code in enumerate(spec.classes):
        if i in new:
            continue
        if code in codes and codes[code]["fate"] == "dropped":
            continue  # a singleton dropped by policy: already named
        codes[code] = {**codes.get(code, {}), "fate": "dropped", "photos": lost[code],
                       "reason": f"no ruling before {cuts[0]}: cannot be learned ({lost[code]} later photos)"
                       if cuts else "no training photo"}
    return replace(spec, classes=[spec.classes[i] for i in trained],
                   samples=[replace(s, label=new[s.label]) for s in spec.samples if s.label in new],
                   removed={**spec.removed, "no_training_photos": sum(lost.values())}, codes=codes)


def spec_summary(spec: DatasetSpec) -> dict:
    return {"name": spec.name, "protocol": spec.protocol, "classes": len(spec.classes),
            "fingerprint": spec.fingerprint(),
            "photos": {sp: len(spec.split(sp, originals_only=True)) for sp in SPLITS},
            "generated": {sp: len(spec.split(sp)) - len(spec.split(sp, originals_only=True)) for sp in SPLITS},
            "skipped_photos": len(spec.skipped), "removed": spec.removed,
            "near_duplicate_clusters": len(spec.near_duplicates),
            "codes": dict(collections.Counter(f["fate"] for f in spec.codes.values() if f["fate"] != "kept"))}


__all__ = ["Sample", "DatasetSpec", "build_dataset", "spec_summary", "asdict"]
