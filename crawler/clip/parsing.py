"""Reading the portal's answers: the JSON list and the HTML detail fragment.

Every assumption about the portal's markup lives here (table of th/td rows, which <img> is a photo, where the
decided code sits), so a change on the live site is one edit. Where an answer does not have the expected shape,
a PortalError names the difference in one line.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

import lxml.html
from lxml.etree import ParserError

from hsflow.data.store import HS_PATTERN

EM = re.compile(r"</?em\b[^>]*>", re.I)
BR = re.compile(r"<br\s*/?>", re.I)
# Detail row labels -> the list's field names, so a record has one name per field whichever answer it came from.
LABELS = {"참조번호": "REFF_NO", "시행일자": "ENFR_DT", "시행기관": "ENFR_ISTT", "결정세번": "DTRM_HS_SGN",
          "품명": "CMDT_NM", "물품설명": "CMDT_DESC", "결정사유": "DTRM_RSN_CN", "문서번호": "DOCID"}
# Cut at ~176 characters in the list: only the detail has them in full.
FULL_ONLY = ("CMDT_DESC", "DTRM_RSN_CN")
# Site chrome (print/close buttons, bullets) as opposed to product photos. The live markup is unrecorded: this
# is the one guess, kept here.
ICON = re.compile(r"(/(common|cmmn|icons?|btn|bullet)/|(^|/)(ico|icon|btn|bul|bullet|blank)[^/]*$|\.svg$)", re.I)


# What an HTML page where data was expected means; a retry helps when the session had expired, not otherwise.
HEADER_RULE = ("the portal did not accept the ajax headers (X-Requested-With, isAjax, Referer) or the session "
               "cookies")


class PortalError(ValueError):
    """An answer that is not what the protocol says; `retry` says whether asking again may help."""

    def __init__(self, message: str, *, reason: str, retry: bool):
        super().__init__(message)
        self.reason, self.retry = reason, retry


def strip_em(text: str) -> str:
    return EM.sub("", text)


def parse_list(body: bytes) -> tuple[int, list[dict]]:
    """A list answer -> (thisTotalCount, items with <em> stripped)."""
    text = body.decode("utf-8", "replace").lstrip()
    if text.startswith("<"):
        raise PortalError(f"an HTML page instead of JSON: {HEADER_RULE}", reason="html_page", retry=True)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PortalError(f"malformed JSON list ({exc.msg} at {exc.pos})", reason="malformed_json",
                          retry=True) from None
    if not isinstance(data, dict) or "uls_dmst" not in data:
        raise PortalError(f"error envelope (JSON without uls_dmst): {text[:120]}", reason="error_envelope",
                          retry=True)
    inner = data["uls_dmst"]
    total = inner.get("thisTotalCount") if isinstance(inner, dict) else None
    items = inner.get("itemList") if isinstance(inner, dict) else None
    try:
        total = int(total)
    except (TypeError, ValueError):
        raise PortalError(f"list without a numeric uls_dmst.thisTotalCount: {total!r}", reason="malformed_json",
                          retry=True) from None
    if not isinstance(items, list):
        raise PortalError("list without uls_dmst.itemList", reason="malformed_json", retry=True)
    return total, [{k: strip_em("" if v is None else str(v)) for k, v in it.items()} if isinstance(it, dict)
                   else {} for it in items]


@dataclass
class Detail:
    fields: dict[str, str]   # field name (or the row's label, if unknown) -> full text
    photos: list[str]        # img src values in page order, icons left out


def parse_detail(body: bytes) -> Detail:
    """A detail fragment -> its fields (decided code reduced to the code itself) and photo srcs."""
    text = body.decode("utf-8", "replace")
    if text.lstrip().startswith("{"):
        raise PortalError(f"error envelope instead of the detail: {text.strip()[:120]}", reason="error_envelope",
                          retry=True)
    if re.search(r"<html\b", text[:2000], re.I):  # a whole page, not the fragment
        raise PortalError(f"an HTML page instead of the detail fragment: {HEADER_RULE}", reason="html_page",
                          retry=True)
    try:
        root = lxml.html.fragment_fromstring(BR.sub("\n", text), create_parent="div")
    except (ParserError, ValueError) as exc:
        raise PortalError(f"unparseable detail HTML ({exc})", reason="malformed_html", retry=False) from None
    fields: dict[str, str] = {}
    for th in root.iter("th"):
        td = th.getnext()
        if td is None or td.tag != "td":
            continue
        for button in list(td.iter("button")):  # button text ("관세율표 해설서") is UI, not data
            button.drop_tree()
        value = td.text_content().strip()
        if value or not list(td.iter("img")):
            fields[LABELS.get(th.text_content().strip(), th.text_content().strip())] = value
    m = HS_PATTERN.search(fields.get("DTRM_HS_SGN", ""))
    if not m:
        raise PortalError(f"no decided code (결정세번, like 0808.10-0000) in the detail: "
                          f"{fields.get('DTRM_HS_SGN', '(no such row)')!r}", reason="malformed_html", retry=False)
    fields["DTRM_HS_SGN"] = m.group(0)
    photos = []
    for img in root.iter("img"):
        src = (img.get("src") or "").strip()
        if src and not ICON.search(src.split("?")[0]) and src not in photos:
            photos.append(src)
    return Detail(fields, photos)


def retry_reason(kind: str, body: bytes) -> str | None:
    """Why a list/detail answer deserves another try (error envelope, malformed JSON), or None."""
    try:
        if kind == "list":
            parse_list(body)
        elif kind == "detail":
            parse_detail(body)
    except PortalError as exc:
        return exc.reason if exc.retry else None
    return None
