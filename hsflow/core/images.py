"""Safe photo decoding: one place that turns a file into an RGB PIL image or a clear error.

Every reader of photos (dataset build, feature extraction, recommend, crawler validation) goes through here so
that a truncated, empty, hostile or oversized file fails the same way everywhere: a `PhotoError` naming the file
and the reason, never a crash deep inside a DataLoader worker.
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path

from PIL import Image, ImageFile, UnidentifiedImageError

# A decompression bomb is refused before decoding: 50 MP is far above any product photo (the portal's are < 2 MP).
MAX_PIXELS = 50_000_000
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
# Truncated files must fail, not be silently padded with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class PhotoError(ValueError):
    """A photo that cannot be used; str() is one line: '<path>: <reason>'."""

    def __init__(self, path: str | Path, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"{path}: {reason}")


def open_rgb(source: str | Path | bytes, *, name: str | None = None, max_pixels: int = MAX_PIXELS,
             draft_size: int | None = None) -> Image.Image:
    """Decode `source` (a path or the bytes of a file) to an RGB image, or raise PhotoError.

    `draft_size` lets JPEG decode at a reduced scale (PIL `draft`) when the consumer only needs that many pixels
    on the short side: a 4x smaller decode is several times faster and changes nothing after the resize.
    Grayscale, CMYK, palette and alpha images are converted (alpha composited on white), not refused.
    """
    label = name or (str(source) if not isinstance(source, bytes) else "<bytes>")
    try:
        if isinstance(source, bytes):
            if not source:
                raise PhotoError(label, "empty file (0 bytes)")
            fp = io.BytesIO(source)
        else:
            path = Path(source)
            if not path.is_file():
                raise PhotoError(label, "file not found")
            if path.stat().st_size == 0:
                raise PhotoError(label, "empty file (0 bytes)")
            fp = path.open("rb")
        with fp:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = Image.open(fp)
                w, h = img.size
                if w * h > max_pixels:
                    raise PhotoError(label, f"image too large ({w}x{h} = {w * h:,} pixels > limit {max_pixels:,})")
                if draft_size and img.format == "JPEG":
                    img.draft("RGB", (draft_size, draft_size))
                img.load()
    except PhotoError:
        raise
    except UnidentifiedImageError:
        raise PhotoError(label, "not an image (unrecognised format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise PhotoError(label, f"image too large (decompression bomb guard: {exc})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise PhotoError(label, f"cannot decode ({exc})") from None
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")


def preprocess_array(img: Image.Image, spec: dict):
    """The network's input for one RGB photo as a float32 CHW numpy array, without torch: resize the short side to
    spec["resize"] (PIL bilinear, antialiased), centre-crop spec["size"], scale to [0, 1], normalise by spec["mean"]
    and spec["std"]. The same numbers as hsflow.data.transforms.build_preprocess (torchvision), to the bit
    (tests/test_onnx_runtime.py): the served model's environment has no torch."""
    import numpy as np

    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = int(spec["resize"]), int(int(spec["resize"]) * long / short)
    size = (new_short, new_long) if w <= h else (new_long, new_short)
    if size != (w, h):
        img = img.resize(size, Image.BILINEAR)
    crop = int(spec["size"])
    top, left = int(round((size[1] - crop) / 2.0)), int(round((size[0] - crop) / 2.0))
    x = np.asarray(img.crop((left, top, left + crop, top + crop)), dtype=np.uint8).astype(np.float32) / np.float32(255)
    mean, std = np.asarray(spec["mean"], np.float32), np.asarray(spec["std"], np.float32)
    return np.ascontiguousarray(((x - mean) / std).transpose(2, 0, 1))
