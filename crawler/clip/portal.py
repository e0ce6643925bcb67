"""What the spider sends: the portal's URLs, categories, form fields and headers (../shared/clip-protocol.md)."""
from __future__ import annotations

from dataclasses import dataclass

REAL_BASE_URL = "https://unipass.customs.go.kr"
ROOT = "/clip/prlstclsfsrch"
LIST_ENDPOINT = "retrieveDmstPrlstClsfCaseLst2.do"


@dataclass(frozen=True)
class Category:
    name: str
    segment: str          # path segment after ROOT ("" for the classification rulings)
    screen: str           # the search screen that sets the session cookies
    tpcd: str             # prlstClsfCaseTpcd
    detail: str           # detail endpoint
    mttr_tpcd: str | None  # mttrTpcd sent with the detail, where the category has one

    def url(self, base: str, endpoint: str) -> str:
        return f"{base.rstrip('/')}{ROOT}{'/' + self.segment if self.segment else ''}/{endpoint}"


CATEGORIES = {c.name: c for c in (
    Category("rulings", "", "openULS0203002S.do", "01", "retrieveDmstPrlstClsfCaseDtl.do", None),
    Category("council", "cncidtrm", "openULS0203005S.do", "03", "retrieveDmstPrlstClsfCaseDtl2.do", "02"),
    Category("committee", "cmitdtrm", "openULS0203008S.do", "04", "retrieveDmstPrlstClsfCaseDtl2.do", "01"),
)}


def ajax_headers(referer: str) -> dict[str, str]:
    """Without these the portal answers an HTML error page with status 200."""
    return {"X-Requested-With": "XMLHttpRequest", "isAjax": "true", "Referer": referer,
            "Accept": "application/json, text/javascript, */*; q=0.01"}


def list_form(cat: Category, start: str, end: str, page: int, unit: int) -> dict[str, str]:
    """The list query: the names the server reads (pageIndex/pageUnit) and the screen's (initPageIndex/...)."""
    form = dict.fromkeys(("dtrmHsSgn", "cmdtNm", "cmdtDesc", "dtrmRsnCn", "srwr", "reffNo", "rrdcNo", "docId",
                          "sortColm", "sortOrdr", "atntSrchTp", "scrnId"), "")
    form.update(srchYn="Y", scrnTp="WDTH", stDt=start, edDt=end, pageIndex=str(page), pageUnit=str(unit),
                initPageIndex=str(page), pagePerRecord=str(unit), prlstClsfCaseTpcd=cat.tpcd)
    return form


def detail_form(cat: Category, rrdc_no: str) -> dict[str, str]:
    form = {"rrdcNo": rrdc_no}
    if cat.mttr_tpcd:
        form["mttrTpcd"] = cat.mttr_tpcd
    return form
