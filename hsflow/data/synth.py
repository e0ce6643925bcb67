"""Synthetic portal-shaped archives at any scale: `python -m hsflow.data.synth OUT --rulings N --codes M [--seed S]`.

Writes OUT/rulings.jsonl + OUT/images/ in the shape of shared/demo-portal (the portal's field names, ENFR_DT spread
over 2007-2019 so the default dated split has train, validation and test years), for `hsflow.store
import-archive`. Codes are real HS 2022 subheadings (so recommend describes them); rulings per code follow a
long tail (every code at least once, a Zipf share of the rest: a few codes get hundreds); photos are small drawings
whose colours, shape and texture are fixed per code and whose placement, size and light vary per photo:
cheap to make and decode, and learnable, so a training run at this scale measures something.
"""
from __future__ import annotations

import argparse
import colorsys
import json
import random
import sys
from datetime import date, timedelta
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

FIRST, LAST = date(2007, 1, 1), date(2019, 12, 31)
SHAPES = ("ellipse", "rectangle", "triangle", "stripes", "ring", "cross")


def pick_codes(m: int, rng: random.Random) -> list[str]:
    """m distinct 10-digit codes: real HS 6-digit subheadings with the national suffix 0000 (then 0001, ...)."""
    from hsflow.core.hs import nomenclature

    six = sorted(c for c in nomenclature() if len(c) == 6)
    codes = []
    suffix = 0
    while len(codes) < m:
        batch = rng.sample(six, min(len(six), m - len(codes)))
        codes += [f"{c}{suffix:04d}" for c in batch]
        suffix += 1
    return codes


def rulings_per_code(n: int, m: int, rng: random.Random, exponent: float = 1.0) -> list[int]:
    """Every code once, the other n - m rulings by Zipf weights (rank r gets 1/r^exponent)."""
    if n < m:
        raise ValueError(f"--rulings {n} < --codes {m}: every code needs at least one ruling")
    weights = [1 / (r + 1) ** exponent for r in range(m)]
    extra = rng.choices(range(m), weights=weights, k=n - m)
    counts = [1] * m
    for i in extra:
        counts[i] += 1
    return counts


def code_style(i: int) -> dict:
    """What makes a code's photos alike: colours, shape and texture, spread over the code index."""
    r = random.Random(f"style:{i}")
    hue = (i * 0.618034) % 1.0  # golden-ratio hues stay apart for any number of codes

    def rgb(h, s, v):
        return tuple(int(255 * x) for x in colorsys.hsv_to_rgb(h % 1.0, s, v))

    return {"bg": rgb(hue, 0.25 + 0.5 * r.random(), 0.55 + 0.4 * r.random()),
            "fg": rgb(hue + 0.33 + 0.34 * r.random(), 0.6 + 0.4 * r.random(), 0.35 + 0.6 * r.random()),
            "shape": SHAPES[i % len(SHAPES)], "stripes": 2 + (i // len(SHAPES)) % 6, "angle": r.uniform(0, 180)}


def draw_photo(style: dict, rng: random.Random, size: int = 72) -> Image.Image:
    img = Image.new("RGB", (size, size), style["bg"])
    d = ImageDraw.Draw(img)
    s = rng.uniform(0.35, 0.7) * size
    x, y = rng.uniform(0, size - s), rng.uniform(0, size - s)
    box = (x, y, x + s, y + s)
    fg = style["fg"]
    if style["shape"] == "ellipse":
        d.ellipse(box, fill=fg)
    elif style["shape"] == "rectangle":
        d.rectangle(box, fill=fg)
    elif style["shape"] == "triangle":
        d.polygon([(x, y + s), (x + s / 2, y), (x + s, y + s)], fill=fg)
    elif style["shape"] == "ring":
        d.ellipse(box, outline=fg, width=max(2, int(s / 6)))
    elif style["shape"] == "cross":
        d.rectangle((x + s * 0.4, y, x + s * 0.6, y + s), fill=fg)
        d.rectangle((x, y + s * 0.4, x + s, y + s * 0.6), fill=fg)
    else:  # stripes over the whole photo
        step = size / style["stripes"] / 2
        off = rng.uniform(0, step)
        for k in range(-2, 2 * style["stripes"] + 2, 2):
            d.rectangle((k * step + off, -size, (k + 1) * step + off, 2 * size), fill=fg)
    if style["shape"] == "stripes":
        img = img.rotate(style["angle"] + rng.uniform(-10, 10), fillcolor=style["bg"])
    else:  # a second, smaller copy of the shape's colour as texture
        for _ in range(style["stripes"]):
            cx, cy = rng.uniform(0, size), rng.uniform(0, size)
            d.ellipse((cx - 2, cy - 2, cx + 2, cy + 2), fill=fg)
    # Light falls differently on every photo: a random 4x4 brightness field, smoothly upscaled. It gives each photo
    # its own grey-level structure (the perceptual hash looks at grey levels only), so photos are not
    # near-duplicates of each other, while the code stays in the hues and the shape.
    field = Image.frombytes("L", (4, 4), bytes(rng.randrange(150, 256) for _ in range(16)))
    field = field.resize((size, size), Image.BICUBIC)
    img = Image.composite(img, Image.new("RGB", (size, size), (0, 0, 0)), field)
    return img.filter(ImageFilter.GaussianBlur(rng.uniform(0, 0.8)))


def generate(out: Path, n_rulings: int, n_codes: int, seed: int = 0, photo_size: int = 72) -> dict:
    """Write the archive; returns {"rulings", "photos", "codes", "max_rulings_per_code", "codes_with_one_ruling"}."""
    rng = random.Random(seed)
    codes = pick_codes(n_codes, rng)
    counts = rulings_per_code(n_rulings, n_codes, rng)
    (out / "images").mkdir(parents=True, exist_ok=True)
    span = (LAST - FIRST).days
    rulings = [(i, rng.randrange(span + 1)) for i, c in enumerate(counts) for _ in range(c)]
    rulings.sort(key=lambda r: (r[1], r[0]))
    n_photos = 0
    with (out / "rulings.jsonl").open("w", encoding="utf-8") as fh:
        for serial, (i, day) in enumerate(rulings, 1):
            when = FIRST + timedelta(days=day)
            rrdc = f"99{when.year}{serial:07d}"
            code = codes[i]
            sign = f"{code[:4]}.{code[4:6]}-{code[6:]}"
            style = code_style(i)
            k = rng.choices((1, 2, 3, 4), weights=(0.2, 0.25, 0.3, 0.25))[0]
            images = []
            for j in range(1, k + 1):
                name = f"{rrdc}-{j}.jpg"
                draw_photo(style, rng, photo_size).save(out / "images" / name, "JPEG", quality=85)
                images.append(name)
            n_photos += k
            fh.write(json.dumps({"RRDC_NO": rrdc, "REFF_NO": f"SYN-{when.year}-{serial:07d}",
                                 "ENFR_DT": when.isoformat(), "ENFR_ISTT": "관세평가분류원", "DTRM_HS_SGN": sign,
                                 "CMDT_NM": f"synthetic item {i}", "CMDT_DESC": f"Synthetic photos of code {sign}.",
                                 "DTRM_RSN_CN": f"통칙 제1호 및 제6호에 따라 {sign}에 분류함", "images": images,
                                 "source_class": f"synthetic-{i}"}, ensure_ascii=False) + "\n")
    return {"rulings": len(rulings), "photos": n_photos, "codes": n_codes, "max_rulings_per_code": max(counts),
            "codes_with_one_ruling": sum(c == 1 for c in counts)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hsflow.data.synth", description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="folder to write rulings.jsonl and images/ into")
    ap.add_argument("--rulings", type=int, default=10_000)
    ap.add_argument("--codes", type=int, default=3_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--photo-size", type=int, default=72, help="pixels per side")
    args = ap.parse_args(argv)
    try:
        print(json.dumps(generate(args.out, args.rulings, args.codes, args.seed, args.photo_size)))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
