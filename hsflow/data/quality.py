"""The study's quality filter as configurable rules: minimum size, blur, near-duplicates.

Per-photo statistics (pixel size, sharpness = variance of the Laplacian, 64-bit perceptual hash) are computed
once per photo content (sha256) and cached in `<cache_dir>/photo_stats.json`, so a grid pays for them once.

Rules (config `dataset.quality`, every rule off when 0/null):
    min_side                  drop photos whose short side is under this many pixels
    min_sharpness             drop photos whose Laplacian variance (on a 256-px grey copy) is under this value
    near_duplicates.max_distance   photos whose perceptual hashes differ in at most this many bits are one
                              cluster: a cluster never straddles the split line (the builder keeps it on one side)
    near_duplicates.keep      all | one  (one: keep only the first photo of each cluster)
A cluster that spans two decided codes is an ambiguous label: only the photos of its most common code stay.
"""
from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from hsflow.core.images import PhotoError, open_rgb
from hsflow.data.store import Photo, atomic_write

STATS_VERSION = 1
STATS_SIDE = 256  # sharpness is scale-dependent: measure every photo at the same short side


def sharpness(img) -> float:
    """Variance of the 4-neighbour Laplacian of the grey image (low = blurry)."""
    g = np.asarray(img.convert("L"), dtype=np.float32)
    lap = g[1:-1, :-2] + g[1:-1, 2:] + g[:-2, 1:-1] + g[2:, 1:-1] - 4 * g[1:-1, 1:-1]
    return float(lap.var())


def measure(path: Path) -> dict:
    import imagehash

    img = open_rgb(path, draft_size=STATS_SIDE)
    if min(img.size) > STATS_SIDE:
        scale = STATS_SIDE / min(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), resample=2)
    return {"sharpness": round(sharpness(img), 3), "phash": str(imagehash.phash(img))}


def photo_stats(photos: list[Photo], cache_dir: str | Path | None, verbose: bool = True) -> dict[str, dict]:
    """sha256 -> {"sharpness", "phash"} for every photo, computing only what the cache lacks."""
    path = Path(cache_dir) / "photo_stats.json" if cache_dir else None
    stats: dict[str, dict] = {}
    if path and path.is_file():
        try:
            data = json.loads(path.read_text())
            if data.get("version") == STATS_VERSION:
                stats = data["photos"]
        except (OSError, ValueError, KeyError):
            stats = {}  # a damaged cache is rebuilt, never trusted
    todo = {p.sha256: p for p in photos if p.sha256 not in stats}
    for sha, p in tqdm(todo.items(), desc="photo quality stats", unit="photo", disable=not verbose or not todo):
        try:
            stats[sha] = measure(p.path)
        except PhotoError:
            continue  # already reported by the decode check
    if path and todo:
        atomic_write(path, json.dumps({"version": STATS_VERSION, "photos": stats}).encode())
    return stats


def near_duplicate_clusters(photos: list[Photo], stats: dict[str, dict], max_distance: int) -> list[list[int]]:
    """Indices of photos grouped by perceptual-hash distance <= max_distance (single linkage), size >= 2."""
    idx = [i for i, p in enumerate(photos) if p.sha256 in stats]
    if len(idx) < 2:
        return []
    hashes = np.array([int(stats[photos[i].sha256]["phash"], 16) for i in idx], dtype=np.uint64)
    parent = list(range(len(idx)))

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    def union(a, bs):
        for b in bs:
            ra, rb = find(a), find(int(b))
            if ra != rb:
                parent[rb] = ra

    # Pigeonhole index: two hashes within max_distance bits agree exactly on at least one of max_distance + 1
    # bands of bits, so only photos sharing a band value are compared (~n log n for varied photos, not n^2).
    bands = max_distance + 1
    width = 64 // bands
    if width < 4:  # bands too thin to narrow anything: one row of the distance matrix at a time, O(n) memory
        for a in range(len(idx) - 1):
            union(a, np.nonzero(np.bitwise_count(hashes[a + 1:] ^ hashes[a]) <= max_distance)[0] + a + 1)
    for band in range(bands if width >= 4 else 0):
        lo = band * width
        bits = 64 - lo if band == bands - 1 else width
        key = (hashes >> np.uint64(lo)) & np.uint64((1 << bits) - 1)
        order = np.argsort(key, kind="stable")
        cuts = np.nonzero(np.diff(key[order]))[0] + 1
        for bucket in np.split(order, cuts):
            for j in range(len(bucket) - 1):
                a, rest = bucket[j], bucket[j + 1:]
                union(int(a), rest[np.bitwise_count(hashes[rest] ^ hashes[a]) <= max_distance])
    groups = collections.defaultdict(list)
    for k, i in enumerate(idx):
        groups[find(k)].append(i)
    return sorted((sorted(g) for g in groups.values() if len(g) > 1), key=lambda g: g[0])


def apply(photos: list[Photo], rules, cache_dir, verbose: bool = True,
          conflict_cost: collections.Counter | None = None) -> tuple[list[Photo], dict, list[list[str]]]:
    """Filter `photos` by the rules; returns (kept photos, removed count per rule, near-duplicate clusters of the
    kept photos as lists of file names). `conflict_cost`, when given, counts per code the photos that
    near-duplicate conflicts removed (the builder names the codes they cost)."""
    rules = rules or {}
    min_side = int(rules.get("min_side") or 0)
    min_sharp = float(rules.get("min_sharpness") or 0)
    nd = rules.get("near_duplicates") or {}
    max_dist = nd.get("max_distance")
    keep_mode = str(nd.get("keep", "all"))
    if keep_mode not in ("all", "one"):
        raise ValueError(f"dataset.quality.near_duplicates.keep={keep_mode!r}: choose all or one")
    removed = {"min_side": 0, "blurry": 0, "near_duplicate": 0, "near_duplicate_conflict": 0}
    if not (min_side or min_sharp or max_dist is not None):
        return photos, removed, []

    stats = photo_stats(photos, cache_dir, verbose) if (min_sharp or max_dist is not None) else {}
    kept = []
    for p in photos:
        if min_side and min(p.width, p.height) < min_side:
            removed["min_side"] += 1
        elif min_sharp and p.sha256 in stats and stats[p.sha256]["sharpness"] < min_sharp:
            removed["blurry"] += 1
        else:
            kept.append(p)
    if max_dist is None:
        return kept, removed, []

    drop: set[int] = set()
    clusters = []
    for group in near_duplicate_clusters(kept, stats, int(max_dist)):
        codes = collections.Counter(kept[i].hs_code for i in group)
        major = max(codes, key=lambda c: (codes[c], c))
        conflict = [i for i in group if kept[i].hs_code != major]
        if conflict_cost is not None:
            conflict_cost.update(kept[i].hs_code for i in conflict)
        removed["near_duplicate_conflict"] += len(conflict)
        drop.update(conflict)
        group = [i for i in group if kept[i].hs_code == major]
        if keep_mode == "one":
            removed["near_duplicate"] += len(group) - 1
            drop.update(group[1:])
            group = group[:1]
        if len(group) > 1:
            clusters.append([kept[i].file for i in group])
    return [p for i, p in enumerate(kept) if i not in drop], removed, clusters
