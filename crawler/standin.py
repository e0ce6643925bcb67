"""A local stand-in of the CLIP rulings portal, for tests, benchmarks and the offline demo.

It serves an archive through the endpoints, header rule, JSON/HTML shapes and quirks written down in
`../shared/clip-protocol.md`, so the spider is exercised against the protocol and never against the real site:

    python -m crawler.standin --archive ../shared/demo-portal --port 8765 [--faults 0.2 --seed 1] [--hostile]

The archive is either portal-shaped (`rulings.jsonl` + `images/`, like `../shared/demo-portal`) or a raw store
(`STORE.json` + `rulings/*.json` + `photos/`, like the shipped `data/demo`). A record's category is its
`category` key (raw stores have one) and `rulings` otherwise, so the demo data all sit under 품목분류사례 and a
test archive can place records in the council and committee categories.

Quirks reproduced: session cookies from the screen, an HTML error page (status 200) without the ajax headers or
cookie, HTTP 400 without `prlstClsfCaseTpcd`, an empty answer for a category/code mismatch, `<em>` highlights,
dotted/hyphenated codes, list text cut at 176 characters, decided codes spelled `제…호` / `…(상의)` / with button
text after them, a site icon among the photos, and the error envelope for pages deeper than 28.
`--faults RATE` injects error envelopes, HTTP 500s, slow answers, truncated photo bodies and repeated list items;
`--hostile` adds records with an escaping photo path, a non-image photo, a decompression bomb, malformed detail
HTML, an unsafe ruling number and a list page that answers malformed JSON.
"""
from __future__ import annotations

import argparse
import contextlib
import html
import json
import random
import struct
import threading
import time
import uuid
import zlib
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

# path segment -> (category, screen, prlstClsfCaseTpcd, detail endpoint, mttrTpcd); from clip-protocol.md
CATEGORIES = {
    "": ("rulings", "openULS0203002S.do", "01", "retrieveDmstPrlstClsfCaseDtl.do", None),
    "cncidtrm": ("council", "openULS0203005S.do", "03", "retrieveDmstPrlstClsfCaseDtl2.do", "02"),
    "cmitdtrm": ("committee", "openULS0203008S.do", "04", "retrieveDmstPrlstClsfCaseDtl2.do", "01"),
}
ROOT = "/clip/prlstclsfsrch"
LIST_ENDPOINT = "retrieveDmstPrlstClsfCaseLst2.do"
IMAGE_PREFIX = "/clip/images/"
ICON_SRC = "/clip/images/common/icon_print.gif"
DEEP_PAGE = 28          # the live site fails from about page 29 of a wide range
LIST_CUT = 176          # list text is cut here; the detail has it in full
DEFAULT_PAGE_UNIT = 10  # what the server uses when `pageUnit` is missing
LIST_FIELDS = ("RRDC_NO", "REFF_NO", "DOCID", "ENFR_DT", "DTRM_HS_SGN", "CMDT_NM", "CMDT_DESC", "DTRM_RSN_CN")
DETAIL_ROWS = (("참조번호", "REFF_NO"), ("시행일자", "ENFR_DT"), ("시행기관", "ENFR_ISTT"), ("결정세번", "DTRM_HS_SGN"),
               ("품명", "CMDT_NM"), ("물품설명", "CMDT_DESC"), ("결정사유", "DTRM_RSN_CN"))
ERROR_ENVELOPE = {"errorCode": "SYS0001", "errorMsg": "일시적인 오류가 발생하였습니다. 잠시 후 다시 시도하십시오."}
ERROR_PAGE = "<!DOCTYPE html><html><head><title>오류</title></head><body><p>잘못된 접근입니다.</p></body></html>"
ROBOTS = "User-agent: *\nDisallow: /clip/admin/\n"
# A 1x1 GIF: the site icon, served in case a client (wrongly) asks for it.
ICON_GIF = bytes.fromhex("47494638396101000100800000000000ffffff21f90401000000002c00000000010001000002024401003b")


@dataclass
class Ruling:
    fields: dict
    images: list[str]
    category: str = "rulings"
    bad_detail: str | None = None   # hostile: served instead of the detail fragment
    poison_list: bool = False       # hostile: a list page holding this record answers malformed JSON


@dataclass
class Portal:
    """What the server serves, and how badly it behaves."""
    rulings: list[Ruling]
    files: dict[str, Path | bytes]                  # image name -> file or bytes
    faults: float = 0.0
    seed: int = 0
    slow_s: float = 2.0
    counts: Counter = field(default_factory=Counter)  # requests served, by kind (tests read it)
    url: str = ""

    def __post_init__(self):
        self._rng = random.Random(self.seed)
        self._lock = threading.Lock()
        self.by_category: dict[str, list[Ruling]] = {}
        for r in sorted(self.rulings, key=lambda r: (r.fields["ENFR_DT"], r.fields["RRDC_NO"]), reverse=True):
            self.by_category.setdefault(r.category, []).append(r)

    def fault(self, *kinds: str) -> str | None:
        with self._lock:
            if self.faults and self._rng.random() < self.faults:
                return self._rng.choice(kinds)
        return None

    def count(self, kind: str) -> None:
        with self._lock:
            self.counts[kind] += 1


# -- loading ------------------------------------------------------------------------------------------------------
def load(path: str | Path, *, hostile: bool = False) -> tuple[list[Ruling], dict[str, Path | bytes]]:
    """Read a portal-shaped archive or a raw store into rulings and image files."""
    path = Path(path)
    rulings, files = [], {}
    if (path / "rulings.jsonl").is_file():
        for line in (path / "rulings.jsonl").read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            rec = json.loads(line)
            images = rec.pop("images", [])
            category = rec.pop("category", "rulings")
            rec.pop("source_class", None)  # provenance only, not a field of the real site
            rulings.append(Ruling(rec, images, category))
            files.update({name: path / "images" / name for name in images})
    elif (path / "STORE.json").is_file():
        for rec_path in sorted((path / "rulings").glob("*.json")):
            rec = json.loads(rec_path.read_text(encoding="utf-8"))
            fields = {k: v for k, v in rec["fields"].items() if k != "source_class"}
            # Served under the portal's own file names (`source`), so a crawl gives back the same records.
            served = {p.get("source") or p["file"]: path / "photos" / p["file"] for p in rec.get("photos", [])}
            rulings.append(Ruling(fields, list(served), rec.get("category", "rulings")))
            files.update(served)
    else:
        raise SystemExit(f"error: {path} holds neither rulings.jsonl (an archive) nor STORE.json (a raw store)")
    if hostile:
        extra, extra_files = hostile_records(next(iter(files), None))
        rulings += extra
        files.update(extra_files)
    return rulings, files


def hostile_records(good_image: str | None) -> tuple[list[Ruling], dict[str, bytes]]:
    """Records a crawler must refuse cleanly; all in 2021 (and one in 2005), outside the demo's 2007-2019."""
    def rec(rrdc: str, date: str = "2021-06-15") -> dict:
        return {"RRDC_NO": rrdc, "REFF_NO": f"HOSTILE-{rrdc[-4:]}", "DOCID": "", "ENFR_DT": date,
                "ENFR_ISTT": "관세평가분류원", "DTRM_HS_SGN": "2106.90-0000", "CMDT_NM": "적대적 기록",
                "CMDT_DESC": "A record made to test refusals.", "DTRM_RSN_CN": "시험용"}
    good = [good_image] if good_image else []
    rulings = [
        Ruling(rec("9990210000001"), good + ["../../escape.jpg"]),      # a path that would escape the store
        Ruling(rec("9990210000002"), ["hostile-not-image.jpg"]),       # a body that is not an image
        Ruling(rec("9990210000003"), ["hostile-bomb.png"]),            # 20000x20000 pixels, a few KB on disk
        Ruling(rec("9990210000004"), good, bad_detail="<table><tr><th>참조번호</th><td>HOSTILE-0004</td><tr><th>결정"),
        Ruling(rec("../9990210000005"), good),                          # a ruling number that is a path
        Ruling(rec("9990050000006", "2005-03-03"), good, poison_list=True),  # its list page is malformed JSON
    ]
    files = {"hostile-not-image.jpg": b"<html><body>this is not a photo</body></html>\n",
             "hostile-bomb.png": bomb_png()}
    return rulings, files


def bomb_png(side: int = 20000) -> bytes:
    """A single-colour 1-bit PNG of side x side pixels: tiny on disk, gigabytes once decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    comp, row = zlib.compressobj(9), b"\x00" * (1 + (side + 7) // 8)
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


# -- rendering: the portal's shapes and quirks --------------------------------------------------------------------
def _quirk(rrdc: str) -> int:
    return zlib.crc32(rrdc.encode()) % 4


def _highlight(text: str, rrdc: str) -> str:
    """Wrap the first word in <em>, as the portal marks search hits (on a quarter of the records)."""
    if _quirk(rrdc) != 0 or not text:
        return text
    head, _, tail = text.partition(" ")
    return f"<em>{head}</em>" + (f" {tail}" if tail else "")


def list_item(r: Ruling) -> dict:
    f, rrdc = r.fields, r.fields["RRDC_NO"]
    item = {k: str(f.get(k, "")) for k in LIST_FIELDS}
    item["CMDT_NM"] = _highlight(item["CMDT_NM"], rrdc)
    for k in ("CMDT_DESC", "DTRM_RSN_CN"):
        item[k] = item[k][:LIST_CUT]
    return item


def _code_cell(code: str, rrdc: str) -> str:
    shape = ("{c}", "제{c}호", "{c}(상의)", "{c}")[_quirk(rrdc)]
    return (html.escape(shape.format(c=code))
            + ' <button type="button" class="btn_s" onclick="fnHsExpl()">관세율표 해설서</button>')


def detail_fragment(r: Ruling) -> str:
    if r.bad_detail is not None:
        return r.bad_detail
    f, rrdc = r.fields, r.fields["RRDC_NO"]
    rows = []
    for label, key in DETAIL_ROWS:
        value = str(f.get(key, ""))
        if key == "DTRM_HS_SGN":
            cell = _code_cell(value, rrdc)
        else:
            cell = html.escape(value).replace("\n", "<br>")
            if key == "CMDT_NM":
                cell = _highlight(cell, rrdc)
        rows.append(f"<tr><th scope=\"row\">{label}</th><td>{cell}</td></tr>")
    imgs = "".join(f'<img src="{IMAGE_PREFIX}{quote(name, safe="/.")}" alt="{html.escape(name)}" '
                   f'style="max-width:300px">' for name in r.images)
    rows.append(f'<tr><th scope="row">사진</th><td><div class="img_area">{imgs}</div></td></tr>')
    return ('<div class="view_wrap"><div class="btn_area">'
            f'<a href="#" onclick="fnPrint()"><img src="{ICON_SRC}" alt="인쇄"></a></div>'
            '<table class="tbl_view"><caption>품목분류사례 상세</caption><tbody>'
            + "".join(rows) + "</tbody></table></div>")


# -- the HTTP server ----------------------------------------------------------------------------------------------
class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the crawler reuses connections, as with the real site
    server_version = "StandinCLIP/1.0"
    portal: Portal  # set on the subclass made by make_server

    def log_message(self, format, *args):  # noqa: A002 - quiet: tests and the demo show the crawler's view
        pass

    def handle_one_request(self):
        with contextlib.suppress(ConnectionError, TimeoutError):  # a client that gave up on a slow answer
            super().handle_one_request()

    def _send(self, status: int, body: bytes | str, ctype: str, *, headers: list[tuple[str, str]] = (),
              truncate: bool = False) -> None:
        data = body.encode("utf-8") if isinstance(body, str) else body
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        for k, v in headers:
            self.send_header(k, v)
        if truncate:  # promise the whole body, send half, hang up
            self.send_header("Connection", "close")
            self.close_connection = True
            data = data[: len(data) // 2]
        self.end_headers()
        self.wfile.write(data)

    def _json(self, obj) -> None:
        self._send(200, json.dumps(obj, ensure_ascii=False), "application/json;charset=UTF-8")

    def _route(self) -> tuple[str, str, tuple] | None:
        """'/clip/prlstclsfsrch[/<segment>]/<endpoint>' -> (segment, endpoint, category row)."""
        path = urlsplit(self.path).path
        if not path.startswith(ROOT + "/"):
            return None
        parts = path[len(ROOT) + 1:].split("/")
        segment, endpoint = ("", parts[0]) if len(parts) == 1 else (parts[0], parts[1]) if len(parts) == 2 \
            else (None, None)
        if segment not in CATEGORIES:
            return None
        return segment, endpoint, CATEGORIES[segment]

    def do_GET(self):
        p = self.portal
        path = urlsplit(self.path).path
        if path == "/robots.txt":
            p.count("robots")
            return self._send(200, ROBOTS, "text/plain")
        if path == ICON_SRC:
            p.count("icon")
            return self._send(200, ICON_GIF, "image/gif")
        if path.startswith(IMAGE_PREFIX):
            return self._image(unquote(path[len(IMAGE_PREFIX):]))
        route = self._route()
        if route and route[1] == route[2][1]:
            p.count("screen")
            cookies = [("Set-Cookie", f"JSESSIONID={uuid.uuid4().hex.upper()}; Path=/; HttpOnly"),
                       ("Set-Cookie", f"WMONID={uuid.uuid4().hex[:11]}; Path=/")]
            page = "<!DOCTYPE html><html><head><title>품목분류사례</title></head><body><form id=\"searchForm\"></form>"
            return self._send(200, page + "</body></html>", "text/html;charset=UTF-8", headers=cookies)
        p.count("not_found")
        self._send(404, "not found", "text/plain")

    def _image(self, name: str) -> None:
        p = self.portal
        p.count("photo")
        src = p.files.get(name)
        if src is None:
            return self._send(404, "not found", "text/plain")
        fault = p.fault("500", "slow", "truncated")
        if fault == "500":
            return self._send(500, "Internal Server Error", "text/plain")
        if fault == "slow":
            time.sleep(p.slow_s)
        data = src if isinstance(src, bytes) else src.read_bytes()
        ctype = "image/png" if name.endswith(".png") else "image/jpeg"
        self._send(200, data, ctype, truncate=fault == "truncated")

    def do_POST(self):
        p = self.portal
        form = {k: v[0] for k, v in parse_qs(self.rfile.read(int(self.headers.get("Content-Length") or 0))
                                             .decode("utf-8"), keep_blank_values=True).items()}
        route = self._route()
        if route is None:
            p.count("not_found")
            return self._send(404, "not found", "text/plain")
        segment, endpoint, (category, _screen, tpcd, detail_ep, mttr) = route
        # The header rule: a data call without the ajax headers, Referer or session gets an HTML page, status 200.
        h = self.headers
        if (h.get("X-Requested-With") != "XMLHttpRequest" or h.get("isAjax") != "true" or not h.get("Referer")
                or "JSESSIONID=" not in (h.get("Cookie") or "")):
            p.count("header_rule")
            return self._send(200, ERROR_PAGE, "text/html;charset=UTF-8")
        if endpoint == LIST_ENDPOINT:
            return self._list(form, category, tpcd)
        if endpoint == detail_ep:
            return self._detail(form, category, mttr)
        p.count("not_found")
        self._send(404, "not found", "text/plain")

    def _fault(self) -> bool:
        """The portal's misbehaviour for list and detail requests: an error envelope, a 500 or a slow answer.
        True when a faulty answer was sent instead of the real one."""
        fault = self.portal.fault("envelope", "500", "slow")
        if fault == "envelope":
            self._json(ERROR_ENVELOPE)
        elif fault == "500":
            self._send(500, "<html><body>500 Internal Server Error</body></html>", "text/html")
        elif fault == "slow":
            time.sleep(self.portal.slow_s)
        return fault in ("envelope", "500")

    def _list(self, form: dict, category: str, tpcd: str) -> None:
        p = self.portal
        p.count("list")
        if "prlstClsfCaseTpcd" not in form:
            return self._send(400, "Bad Request", "text/html")
        if self._fault():
            return
        if form["prlstClsfCaseTpcd"] != tpcd:  # another category's code under this path: empty, not an error
            return self._json({"uls_dmst": {"thisTotalCount": 0, "itemList": []}})
        st, ed = form.get("stDt") or "0000-00-00", form.get("edDt") or "9999-99-99"
        try:
            page = max(1, int(form.get("pageIndex") or 1))
            unit = max(1, int(form.get("pageUnit") or DEFAULT_PAGE_UNIT))
        except ValueError:
            return self._send(400, "Bad Request", "text/html")
        if page > DEEP_PAGE:
            return self._json(ERROR_ENVELOPE)
        hits = [r for r in p.by_category.get(category, []) if st <= r.fields["ENFR_DT"] <= ed]
        chunk = hits[(page - 1) * unit: page * unit]
        if any(r.poison_list for r in chunk):
            return self._send(200, '{"uls_dmst": {"thisTotalCount": 1, "itemList": [{"RRDC_NO": "99',
                              "application/json;charset=UTF-8")
        items = [list_item(r) for r in chunk]
        # Repeated items, within a page and from the page before, decided per page (not per thread schedule) so a
        # seed gives the same repeats on every run.
        page_rng = random.Random(f"{p.seed}/{category}/{st}/{ed}/{page}/{unit}")
        if p.faults and items and page_rng.random() < p.faults:
            items += page_rng.sample(items, k=max(1, len(items) // 3))
            if page > 1:
                items.insert(0, list_item(hits[(page - 1) * unit - 1]))
        self._json({"uls_dmst": {"thisTotalCount": len(hits), "itemList": items}})

    def _detail(self, form: dict, category: str, mttr: str | None) -> None:
        p = self.portal
        p.count("detail")
        if self._fault():
            return
        rrdc = form.get("rrdcNo", "")
        found = next((r for r in p.by_category.get(category, []) if r.fields["RRDC_NO"] == rrdc), None)
        if found is None or (mttr and form.get("mttrTpcd") != mttr):
            return self._send(200, '<div class="view_wrap"></div>', "text/html;charset=UTF-8")
        self._send(200, detail_fragment(found), "text/html;charset=UTF-8")


def make_server(portal: Portal, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    handler = type("PortalHandler", (Handler,), {"portal": portal})
    server = ThreadingHTTPServer((host, port), handler, bind_and_activate=False)
    server.request_queue_size = 128  # the crawler opens many connections at once with throttling off
    server.daemon_threads = True
    server.allow_reuse_address = True
    server.server_bind()
    server.server_activate()
    portal.url = f"http://{host}:{server.server_address[1]}"
    return server


@contextlib.contextmanager
def serve(archive: str | Path, *, port: int = 0, faults: float = 0.0, seed: int = 0, slow_s: float = 2.0,
          hostile: bool = False):
    """Run the stand-in in a background thread; yields the Portal (its `url`, request `counts`)."""
    rulings, files = load(archive, hostile=hostile)
    portal = Portal(rulings, files, faults=faults, seed=seed, slow_s=slow_s)
    server = make_server(portal, port=port)
    thread = threading.Thread(target=server.serve_forever, name="clip-standin", daemon=True)
    thread.start()
    try:
        yield portal
    finally:
        server.shutdown()
        server.server_close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m crawler.standin", description=__doc__.splitlines()[0])
    ap.add_argument("--archive", required=True, type=Path, help="rulings.jsonl + images/, or a raw store")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--faults", type=float, default=0.0, help="share of requests answered with a fault")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--slow-s", type=float, default=2.0, help="how long a slow answer takes")
    ap.add_argument("--hostile", action="store_true", help="add records the crawler must refuse")
    args = ap.parse_args(argv)
    rulings, files = load(args.archive, hostile=args.hostile)
    portal = Portal(rulings, files, faults=args.faults, seed=args.seed, slow_s=args.slow_s)
    server = make_server(portal, args.host, args.port)
    print(f"stand-in portal: {len(rulings)} rulings, {len(files)} photos from {args.archive} on {portal.url}"
          f" (faults {args.faults}, seed {args.seed}{', hostile' if args.hostile else ''})", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
