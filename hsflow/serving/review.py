"""`python -m hsflow.review [--model URI] [--port 8000]` (`make review`): a review page for brokers on 127.0.0.1.

Drop the photos of one product: the page names the model answering (the registered model's champion by default,
with its version), then shows the product's top HS codes with the nomenclature's text (subheading, heading,
chapter), calibrated probability bars, the review flag, and the precedent rulings (thumbnail, ruling number, date,
decided code, product, reasoning). A small ASGI app (Starlette, served by uvicorn: both come with MLflow) over
the same model folder and the same function as `hsflow.recommend` and the MLflow model (`iter_recommend`).

Uploads are limited in size and type; a file refused or that does not decode gets its own error line in the
answer, the other photos are still used, and the page stays usable.
"""
from __future__ import annotations

import base64
import binascii
import json
import sys
import threading
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from hsflow.models.bundle import HSModel
from hsflow.serving.recommend import IMAGE_EXTS, PhotoInput, answering, as_json, iter_recommend, load, load_error

PAGE = Path(__file__).resolve().parent / "static" / "review.html"
MAX_PHOTO_BYTES = 10 * 1024 * 1024  # per photo: product photos are < 2 MB; far above, something is wrong
MAX_PHOTOS = 12                     # per request: one product's photos
ACCEPTED_TYPES = {"image/jpeg", "image/png", "image/bmp", "image/gif", "image/webp", "image/tiff"}


def photo_input(entry: dict, n: int, item: str) -> PhotoInput:
    """One uploaded file as a PhotoInput, or one refused with the reason (too large, wrong type, not base64)."""
    name = str(entry.get("name") or f"photo {n + 1}")[:200]
    kind = str(entry.get("type") or "")
    if kind not in ACCEPTED_TYPES and Path(name).suffix.lower() not in IMAGE_EXTS:
        return PhotoInput(name, item=item, error=f"{name}: not an accepted type ({kind or 'unknown'}); "
                                                 "send a JPEG, PNG, WebP, GIF, BMP or TIFF photo")
    data = str(entry.get("data") or "")
    if len(data) * 3 // 4 > MAX_PHOTO_BYTES:
        return PhotoInput(name, item=item, error=f"{name}: too large ({len(data) * 3 // 4 / 2**20:.1f} MB; "
                                                 f"the limit is {MAX_PHOTO_BYTES // 2**20} MB a photo)")
    try:
        return PhotoInput(name, base64.b64decode(data, validate=True), item)
    except (binascii.Error, ValueError):
        return PhotoInput(name, item=item, error=f"{name}: the upload was not base64 (reload the page)")


def create_app(model: HSModel, *, top_k: int = 5) -> Starlette:
    lock = threading.Lock()  # one forward at a time: the model's threads already use every core
    max_body = MAX_PHOTOS * (MAX_PHOTO_BYTES * 4 // 3 + 1024) + 4096

    async def page(_: Request):
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    async def recommend(request: Request):
        size = int(request.headers.get("content-length") or 0)
        if size > max_body:
            return JSONResponse({"error": f"request too large ({size / 2**20:.0f} MB): at most {MAX_PHOTOS} "
                                          f"photos of {MAX_PHOTO_BYTES // 2**20} MB"}, status_code=413)
        try:
            body = json.loads(await request.body())
            entries = body["photos"]
            assert isinstance(entries, list) and all(isinstance(e, dict) for e in entries)
        except (ValueError, KeyError, TypeError, AssertionError):
            return JSONResponse({"error": 'send JSON {"photos": [{"name", "type", "data": base64}]}'},
                                status_code=400)
        if not entries or len(entries) > MAX_PHOTOS:
            return JSONResponse({"error": f"send 1 to {MAX_PHOTOS} photos of one product (got {len(entries)})"},
                                status_code=400)
        item = "uploaded photos"  # one product: every photo of a request is one item
        photos = [photo_input(e, n, item) for n, e in enumerate(entries)]

        def answer():
            with lock:
                return [as_json(r) for r in iter_recommend(model, photos, top_k, num_workers=0, progress=False)]

        return JSONResponse({"results": await run_in_threadpool(answer)})

    async def thumbnail(request: Request):
        data = model.precedents.thumbnail(request.path_params["file"]) if model.precedents else None
        if data is None:
            return Response(status_code=404)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=86400"})

    async def about(_: Request):
        meta = model.meta
        return JSONResponse({k: meta.get(k) for k in ("run_id", "backbone", "dataset", "test_top1")}
                            | {"model": answering(model), "classes": len(model.classes), "max_photos": MAX_PHOTOS,
                               "max_photo_mb": MAX_PHOTO_BYTES // 2**20,
                               "precedents": len(model.precedents) if model.precedents else 0})

    return Starlette(routes=[Route("/", page), Route("/api/recommend", recommend, methods=["POST"]),
                             Route("/api/model", about), Route("/thumbs/{file}", thumbnail)])


def main(argv: list[str] | None = None) -> int:
    from hsflow.serving.serve import server_args

    args, uri = server_args("python -m hsflow.review", __doc__.split("\n\n")[0], 8000, argv,
                            lambda ap: ap.add_argument("--top-k", type=int, default=5))
    if uri is None:
        return 2
    try:
        model = load(uri)
    except Exception as exc:  # noqa: BLE001 - any failure to load is one line, never a traceback
        print(f"error: cannot load model {uri!r}: {load_error(uri, exc)}", file=sys.stderr)
        return 2
    import uvicorn

    print(f"review page for {uri} on http://{args.host}:{args.port}/", file=sys.stderr, flush=True)
    uvicorn.run(create_app(model, top_k=args.top_k), host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
