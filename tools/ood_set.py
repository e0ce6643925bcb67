"""Rebuild data/ood/: photos of things that are not the trained goods, for the unknown-score evaluation.

Two parts, both fixed:
- real photos copied from images that Python packages ship inside their wheels (no download at run time):
  scikit-image's skimage/data (only files bundled in the wheel, not the ones its pooch registry fetches),
  scikit-learn's sklearn/datasets/images, matplotlib's mpl-data/sample_data;
- generated scenes (noise, gradients, shapes, rendered text pages, a chart), drawn here with a fixed seed.

Every image is resized to at most 384 px on its long side and stored as JPEG (the set stays < 2 MB); sources and
licences go to data/ood/LICENSES.md. Run once by hand when the set changes (scikit-image need not be installed:
`pip download --no-deps scikit-image` and pass the wheel):

    python tools/ood_set.py --skimage-wheel scikit_image-0.26.0-*.whl
"""
from __future__ import annotations

import argparse
import io
import math
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "data" / "ood"
LONG_SIDE = 384

# (file in the package, name here, what it shows, licence as the package documents it)
SKIMAGE = [
    ("astronaut.png", "person_astronaut", "person: astronaut Eileen Collins",
     "public domain (NASA Great Images database; skimage.data.astronaut docstring)"),
    ("camera.png", "person_cameraman", "person: cameraman, greyscale", "CC0 (photographer Lav Varshney)"),
    ("chelsea.png", "animal_cat", "animal: Chelsea the cat", "CC0 (photographer Stefan van der Walt)"),
    ("horse.png", "animal_horse_silhouette", "animal: horse silhouette (clip art)",
     "CC0 (openclipart, Andreas Preuss)"),
    ("coffee.png", "object_coffee_cup", "object: a cup of espresso on a saucer", "CC0 (photographer Rachel Michetti)"),
    ("rocket.jpg", "vehicle_rocket", "vehicle: SpaceX rocket launch", "public domain (released by SpaceX)"),
    ("brick.png", "texture_brick", "texture: brick wall", "CC0 (CC0Textures Bricks25)"),
    ("grass.png", "texture_grass", "texture: grass", "CC0 (DeviantArt linolafett, Grass 01)"),
    ("gravel.png", "texture_gravel", "texture: gravel", "CC0 (CC0Textures Gravel04)"),
    ("page.png", "document_scanned_page", "document: scanned printed page",
     "BSD-3-Clause (scikit-image package data; no separate notice)"),
    ("text.png", "document_text_sign", "document: text on a sign (Wikipedia File:Corner.png)",
     "public domain (skimage.data.text docstring)"),
    ("hubble_deep_field.jpg", "scene_hubble_deep_field", "scene: Hubble eXtreme Deep Field",
     "public domain (NASA)"),
    ("coins.png", "object_coins", "objects: Greek coins from Pompeii",
     "no known copyright restrictions (Brooklyn Museum collection)"),
    ("moon.png", "scene_moon_surface", "scene: surface of the moon, greyscale",
     "BSD-3-Clause (scikit-image package data; no separate notice)"),
    ("retina.jpg", "medical_retina", "medical: fundus photograph of a retina", "CC0 (Wikimedia, Mikael Haggstrom)"),
    ("ihc.png", "medical_ihc_slide", "medical: immunohistochemistry slide", "no known copyright restrictions (CMMI)"),
    ("clock_motion.png", "object_clock_blurred", "object: motion-blurred wall clock",
     "public domain (photographer Stefan van der Walt)"),
    ("cell.png", "medical_cell", "microscopy: a cell, greyscale", "CC0 (Muller et al. 2018)"),
    ("logo.png", "graphic_skimage_logo", "graphic: scikit-image logo", "BSD-3-Clause (scikit-image)"),
]
SKLEARN = [
    ("china.jpg", "building_china_temple", "building: temple in China",
     "CC-BY-2.0, danielbuechele on Flickr (sklearn/datasets/images/README.txt)"),
    ("flower.jpg", "plant_flower", "plant: a flower (not a traded product of the demo)",
     "CC-BY-2.0, vultilion on Flickr (sklearn/datasets/images/README.txt)"),
]
MATPLOTLIB = [
    ("grace_hopper.jpg", "person_grace_hopper", "person: Grace Hopper, portrait",
     "public domain (US Navy photograph), shipped in matplotlib's sample_data"),
    ("Minduka_Present_Blue_Pack.png", "graphic_gift_box", "graphic: a wrapped gift box (clip art)",
     "public domain (openclipart, Minduka), shipped in matplotlib's sample_data"),
]


def save(img: Image.Image, name: str) -> str:
    img = img.convert("RGBA") if img.mode in ("P", "LA") else img
    if img.mode == "RGBA":  # transparency on white, as hsflow.core.images does
        bg = Image.new("RGB", img.size, "white")
        bg.paste(img, mask=img.getchannel("A"))
        img = bg
    img = img.convert("RGB")
    scale = LONG_SIDE / max(img.size)
    if scale < 1:
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=88)
    (OUT / f"{name}.jpg").write_bytes(buf.getvalue())
    return f"{name}.jpg"


# --- generated scenes ----------------------------------------------------------------------------------------------

def _noise(rng, size=384, octaves=5) -> np.ndarray:
    """Value noise summed over octaves (a cloud/marble texture)."""
    out = np.zeros((size, size))
    for o in range(octaves):
        cells = 2 ** (o + 2)
        grid = rng.random((cells + 1, cells + 1))
        img = Image.fromarray((grid * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
        out += np.asarray(img, dtype=float) / 255 / 2 ** o
    return (out - out.min()) / (np.ptp(out) + 1e-9)


def _font(size: int):
    return ImageFont.load_default(size=size)


def generated(rng) -> list[tuple[Image.Image, str, str]]:
    s = 384
    out = []
    n = _noise(rng)
    out.append((Image.fromarray((np.stack([n * 90 + 60, n * 70 + 40, n * 40 + 20], -1)).astype(np.uint8)),
                "gen_texture_ground", "texture: brown value noise like bare ground"))
    marble = np.sin(np.linspace(0, 12 * math.pi, s)[None, :] + 6 * _noise(rng)) * 0.5 + 0.5
    out.append((Image.fromarray((np.stack([marble] * 3, -1) * 200 + 40).astype(np.uint8)),
                "gen_texture_marble", "texture: grey marble veins"))
    out.append((Image.fromarray((rng.random((s, s, 3)) * 255).astype(np.uint8)), "gen_noise_rgb",
                "noise: uniform RGB pixel noise"))
    y, x = np.mgrid[0:s, 0:s] / s
    out.append((Image.fromarray((np.stack([x, y, 1 - x], -1) * 255).astype(np.uint8)), "gen_gradient",
                "gradient: red-green-blue ramps"))
    checker = ((np.floor(x * 8) + np.floor(y * 8)) % 2)[..., None] * np.array([230, 230, 230]) + 15
    out.append((Image.fromarray(checker.astype(np.uint8)), "gen_checkerboard", "pattern: checkerboard"))
    stripes = (np.sin((x + y) * 40) > 0)[..., None] * np.array([200, 30, 30]) + np.array([20, 20, 90])
    out.append((Image.fromarray(stripes.astype(np.uint8)), "gen_stripes", "pattern: diagonal stripes"))

    shapes = Image.new("RGB", (s, s), (235, 235, 240))
    d = ImageDraw.Draw(shapes)
    for _ in range(14):
        x0, y0 = rng.integers(0, s - 60, 2)
        w, h = rng.integers(30, 140, 2)
        col = tuple(int(c) for c in rng.integers(0, 255, 3))
        [d.ellipse, d.rectangle][int(rng.integers(0, 2))]((x0, y0, x0 + w, y0 + h), fill=col)
    out.append((shapes, "gen_shapes", "shapes: coloured ellipses and rectangles"))

    words = ("invoice customs declaration consignee shipment quantity weight tariff origin article value total "
             "date signature port carrier container number description goods").split()
    page = Image.new("RGB", (300, 400), "white")
    d = ImageDraw.Draw(page)
    d.text((20, 15), "COMMERCIAL INVOICE", fill="black", font=_font(20))
    for row in range(24):
        line = " ".join(rng.choice(words, 5))
        d.text((20, 50 + row * 14), line, fill=(30, 30, 30), font=_font(11))
    out.append((page, "gen_document_invoice", "document: rendered invoice-like text page"))

    table = Image.new("RGB", (400, 300), (250, 250, 245))
    d = ImageDraw.Draw(table)
    for r in range(11):
        d.line((10, 20 + r * 25, 390, 20 + r * 25), fill="black")
    for c in range(5):
        d.line((10 + c * 95, 20, 10 + c * 95, 270), fill="black")
    for r in range(10):
        for c in range(4):
            d.text((16 + c * 95, 26 + r * 25), f"{rng.integers(10, 9999)}", fill="black", font=_font(12))
    out.append((table, "gen_document_table", "document: rendered table of numbers"))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 3), dpi=96)
    ax.bar(range(8), rng.integers(1, 10, 8), color="tab:blue")
    ax.plot(range(8), rng.integers(1, 10, 8), color="tab:orange")
    ax.set_title("quarterly imports")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    out.append((Image.open(buf), "gen_chart", "graphic: bar and line chart"))

    sky = np.stack([0.4 + 0.4 * y, 0.6 + 0.3 * y, np.ones_like(y)], -1)
    ground = y > 0.62
    sky[ground] = np.stack([0.25 + 0.2 * n, 0.45 + 0.2 * n, 0.15 + 0.1 * n], -1)[ground]
    land = Image.fromarray((sky * 255).clip(0, 255).astype(np.uint8))
    ImageDraw.Draw(land).ellipse((270, 40, 330, 100), fill=(255, 230, 120))
    out.append((land, "gen_scene_landscape", "scene: rendered sky, sun and grass"))

    blur = Image.fromarray((rng.random((48, 48, 3)) * 255).astype(np.uint8)).resize((s, s), Image.NEAREST)
    out.append((blur.filter(ImageFilter.GaussianBlur(6)), "gen_blurred_blocks", "noise: blurred colour blocks"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--skimage-wheel", required=True, type=Path, help="a scikit-image wheel (pip download)")
    args = ap.parse_args()
    import matplotlib
    import sklearn

    OUT.mkdir(parents=True, exist_ok=True)
    for old in OUT.glob("*.jpg"):
        old.unlink()
    rows = []
    with zipfile.ZipFile(args.skimage_wheel) as whl:
        version = args.skimage_wheel.name.split("-")[1]
        for src, name, what, lic in SKIMAGE:
            img = Image.open(io.BytesIO(whl.read(f"skimage/data/{src}")))
            rows.append((save(img, name), what, f"scikit-image {version} wheel, skimage/data/{src}", lic))
    sk = Path(sklearn.__file__).parent / "datasets" / "images"
    for src, name, what, lic in SKLEARN:
        rows.append((save(Image.open(sk / src), name), what, f"scikit-learn {sklearn.__version__}, "
                     f"sklearn/datasets/images/{src}", lic))
    mpl = Path(matplotlib.get_data_path()) / "sample_data"
    for src, name, what, lic in MATPLOTLIB:
        rows.append((save(Image.open(mpl / src), name), what, f"matplotlib {matplotlib.__version__}, "
                     f"mpl-data/sample_data/{src}", lic))
    for img, name, what in generated(np.random.default_rng(12)):
        rows.append((save(img, name), what, "generated by tools/ood_set.py (seed 12)", "made for hsflow (MIT)"))

    lines = ["# data/ood: photos of things that are not the trained goods", "",
             "The out-of-scope set of the unknown-score evaluation (`studies/unknown_eval.sh`). Rebuilt by "
             "`python tools/ood_set.py --skimage-wheel <scikit-image wheel>`; every file resized to at most "
             f"{LONG_SIDE} px on its long side and saved as JPEG.", "",
             "| file | what | source | licence |", "|---|---|---|---|"]
    lines += [f"| {f} | {w} | {s} | {lic} |" for f, w, s, lic in rows]
    (OUT / "LICENSES.md").write_text("\n".join(lines) + "\n")
    total = sum(p.stat().st_size for p in OUT.iterdir())
    print(f"{len(rows)} images, {total / 1e6:.2f} MB in {OUT}")


if __name__ == "__main__":
    main()
