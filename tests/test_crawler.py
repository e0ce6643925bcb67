"""The crawler (issue 3): real Scrapy crawls over HTTP on 127.0.0.1 against the local stand-in of the portal.

Each crawl is a `scrapy crawl` child process (crawler/runner.py) with throttling off; the stand-in runs in a
thread of the test process. The full archive is crawled once (module fixture); the fault, kill -9, JOBDIR and
hostile cases crawl one or two years of it, or a small archive, to keep the suite near a minute.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import date
from http.cookiejar import CookieJar
from pathlib import Path

import pytest

from conftest import LOCAL, hosts, net_guard
from crawler.clip.parsing import PortalError, parse_detail, parse_list, strip_em
from crawler.clip.spiders.clip_rulings import halves, unsafe_src, year_ranges
from crawler.runner import FAST, HERE, crawl, crawl_command, env
from crawler.standin import bomb_png, detail_fragment, list_item, load, serve
from hsflow.data.store import RawStore

ROOT = Path(__file__).resolve().parents[1]
ARCHIVE = Path(__file__).parents[1].parent / "shared" / "demo-portal"
DEMO_STORE = ROOT / "data" / "demo"
needs_archive = pytest.mark.skipif(not (ARCHIVE / "rulings.jsonl").is_file(),
                                   reason=f"the demo archive {ARCHIVE} is absent")


def archive_records(start: str = "0000", end: str = "9999") -> dict[str, dict]:
    """The archive's rulings (enforced between start and end), by ruling number."""
    out = {}
    for line in (ARCHIVE / "rulings.jsonl").read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        if start <= rec["ENFR_DT"] <= end:
            out[rec["RRDC_NO"]] = rec
    return out


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_store_matches(store: Path, expected: dict[str, dict]) -> None:
    """Exactly the expected rulings, fields in full, photos byte-identical to the archive's, nothing else."""
    records = {r["rrdc_no"]: r for r in RawStore(store).rulings()}
    assert set(records) == set(expected), (len(records), len(expected))
    referenced = []
    for rrdc, rec in records.items():
        want = expected[rrdc]
        assert rec["hs_code_given"] == want["DTRM_HS_SGN"]
        assert rec["hs_code"] == want["DTRM_HS_SGN"].replace(".", "").replace("-", "")
        for key in ("REFF_NO", "ENFR_DT", "ENFR_ISTT", "DTRM_HS_SGN", "CMDT_NM", "CMDT_DESC", "DTRM_RSN_CN"):
            assert rec["fields"][key] == want[key], (rrdc, key)  # full text, <em> stripped
        assert [p["source"] for p in rec["photos"]] == want["images"]
        for p in rec["photos"]:
            stored = store / "photos" / p["file"]
            assert p["sha256"] == sha256(stored) == sha256(ARCHIVE / "images" / p["source"]), p["file"]
            assert p["bytes"] == stored.stat().st_size and p["width"] > 0 and p["height"] > 0
            referenced.append(p["file"])
    assert len(referenced) == len(set(referenced))  # no photo twice
    assert sorted(referenced) == sorted(p.name for p in (store / "photos").iterdir())  # no orphan, no temp file
    assert not list(store.rglob("*.part"))


def hs(stats: dict, key: str) -> int:
    return stats.get(f"hsflow/{key}", 0)


# -- settings and pure functions: manners and the protocol's shapes ------------------------------------------------------------------------
def test_manners_by_default():
    """Real-portal defaults: AutoThrottle, >= 1 s between requests, robots.txt, a User-Agent with the contact."""
    from scrapy.utils.test import get_crawler

    import crawler.clip.settings as project
    from crawler.clip.spiders.clip_rulings import ClipRulingsSpider

    settings = {k: v for k, v in vars(project).items() if k.isupper()}
    s = get_crawler(ClipRulingsSpider, {**settings, "CLIP_CONTACT": "me@example.org"}).settings
    assert s.getbool("AUTOTHROTTLE_ENABLED") and s.getfloat("DOWNLOAD_DELAY") >= 1 and s.getbool("ROBOTSTXT_OBEY")
    assert "me@example.org" in s["USER_AGENT"] and s["CLIP_BASE_URL"] == "https://unipass.customs.go.kr"
    assert s.getint("RETRY_TIMES") > 0 and s.getfloat("CLIP_BACKOFF_BASE") >= 1


def test_parse_detail_reads_full_fields_code_and_photos():
    from crawler.standin import Ruling

    fields = {"RRDC_NO": "9920160000001", "REFF_NO": "R-1", "ENFR_DT": "2016-04-06", "ENFR_ISTT": "관세평가분류원",
              "DTRM_HS_SGN": "2106.90-0000", "CMDT_NM": "대두 발효식품 (Alpro)", "CMDT_DESC": "x" * 400,
              "DTRM_RSN_CN": "line one\nline two & <three>"}
    for rrdc in ("9920160000001", "9920160000002", "9920160000003", "9920160000004"):  # every code spelling
        d = parse_detail(detail_fragment(Ruling({**fields, "RRDC_NO": rrdc}, ["a-1.jpg", "a 2.jpg"])).encode())
        assert d.fields["DTRM_HS_SGN"] == "2106.90-0000"
        assert d.fields["CMDT_DESC"] == "x" * 400 and d.fields["DTRM_RSN_CN"] == fields["DTRM_RSN_CN"]
        assert d.fields["CMDT_NM"] == fields["CMDT_NM"] and d.fields["ENFR_ISTT"] == "관세평가분류원"
        assert d.photos == ["/clip/images/a-1.jpg", "/clip/images/a%202.jpg"]  # the print icon left out
    item = list_item(Ruling({**fields, "RRDC_NO": "9920160000001"}, []))
    assert len(item["CMDT_DESC"]) == 176
    with pytest.raises(PortalError, match="no decided code"):
        parse_detail(b"<table><tr><th>\xea\xb2\xb0\xec\xa0\x95")
    with pytest.raises(PortalError, match="error envelope"):
        parse_detail(b'{"errorMsg": "x"}')


def test_parse_list_shapes():
    total, items = parse_list('{"uls_dmst": {"thisTotalCount": 3, "itemList": [{"CMDT_NM": "<em>사과</em> 1"}]}}'
                              .encode())
    assert total == 3 and items == [{"CMDT_NM": "사과 1"}]
    assert strip_em('<EM class="hl">a</EM>b') == "ab"
    for body, reason in ((b'{"errorCode": "E"}', "error_envelope"), (b'{"uls_dmst": {"thisTo', "malformed_json"),
                         (b"<!DOCTYPE html><html></html>", "html_page")):
        with pytest.raises(PortalError) as exc:
            parse_list(body)
        assert exc.value.reason == reason and exc.value.retry


def test_date_ranges_and_unsafe_srcs():
    assert year_ranges(date(2018, 5, 1), date(2019, 2, 1)) == [(date(2018, 5, 1), date(2018, 12, 31)),
                                                               (date(2019, 1, 1), date(2019, 2, 1))]
    assert halves(date(2019, 1, 1), date(2019, 12, 31)) == [(date(2019, 1, 1), date(2019, 7, 2)),
                                                            (date(2019, 7, 3), date(2019, 12, 31))]
    assert unsafe_src("/clip/images/../../x.jpg") and unsafe_src("/clip/images/..%2F..%2Fx.jpg")
    assert unsafe_src("file:///etc/passwd") and not unsafe_src("/clip/images/a-1.jpg")


@needs_archive
def test_standin_speaks_the_protocol():
    """Header rule, HTTP 400 without the category code, deep pages, category mismatch: as clip-protocol.md."""
    with serve(ARCHIVE) as portal:
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(CookieJar()))
        base = portal.url + "/clip/prlstclsfsrch"
        screen = opener.open(base + "/openULS0203002S.do")
        assert "JSESSIONID" in screen.headers.get_all("Set-Cookie")[0]

        def post(path, form, headers=True):
            data = "&".join(f"{k}={v}" for k, v in form.items()).encode()
            h = {"X-Requested-With": "XMLHttpRequest", "isAjax": "true", "Referer": base} if headers else {}
            return opener.open(urllib.request.Request(base + path, data=data, headers=h)).read().decode()

        form = {"prlstClsfCaseTpcd": "01", "stDt": "2007-01-01", "edDt": "2019-12-31", "pageIndex": 1,
                "pageUnit": 100}
        answer = json.loads(post("/retrieveDmstPrlstClsfCaseLst2.do", form))["uls_dmst"]
        assert answer["thisTotalCount"] == 955 and len(answer["itemList"]) == 100
        assert post("/retrieveDmstPrlstClsfCaseLst2.do", form, headers=False).startswith("<!DOCTYPE html>")
        assert "uls_dmst" not in post("/retrieveDmstPrlstClsfCaseLst2.do", {**form, "pageIndex": 29,
                                                                            "pageUnit": 10})
        assert json.loads(post("/cncidtrm/retrieveDmstPrlstClsfCaseLst2.do", form))["uls_dmst"][
            "thisTotalCount"] == 0
        with pytest.raises(urllib.error.HTTPError) as exc:
            post("/retrieveDmstPrlstClsfCaseLst2.do", {"stDt": "2007-01-01"})
        assert exc.value.code == 400


# -- real crawls --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def full_crawl(tmp_path_factory):
    """One clean crawl of the whole demo archive (955 rulings, 2,936 photos)."""
    if not (ARCHIVE / "rulings.jsonl").is_file():
        pytest.skip(f"the demo archive {ARCHIVE} is absent")
    store = tmp_path_factory.mktemp("full") / "store"
    with serve(ARCHIVE) as portal:
        t0 = time.perf_counter()
        rc, stats = crawl(portal.url, store, settings=FAST, log=store.parent / "crawl.log")
        seconds = time.perf_counter() - t0
    print(f"\nfull crawl: {hs(stats, 'rulings_stored')} rulings in {seconds:.1f} s "
          f"({hs(stats, 'rulings_stored') / seconds:.1f} rulings/s)")
    assert rc == 0, (store.parent / "crawl.log").read_text()[-3000:]
    return store, stats


def test_full_crawl_stores_every_ruling_and_photo_byte_identical(full_crawl):
    store, stats = full_crawl
    assert hs(stats, "rulings_stored") == 955 and hs(stats, "photos_stored") == 2936
    assert not any(k.startswith("hsflow/refused/") for k in stats)
    assert_store_matches(store, archive_records())
    info = RawStore(store).info()
    assert (info["rulings"], info["photos"], info["codes"], info["undecodable_photos"]) == (955, 2936, 42, 0)
    # The shipped demo's record format (trains the same way): same keys, photo entries with the same keys.
    demo = json.loads(next((DEMO_STORE / "rulings").glob("*.json")).read_text())
    ours = next(RawStore(store).rulings())
    assert set(ours) == set(demo) and set(ours["photos"][0]) == set(demo["photos"][0])
    assert (store / "STORE.json").read_text() == (DEMO_STORE / "STORE.json").read_text()
    long = [r for r in RawStore(store).rulings() if len(r["fields"]["CMDT_DESC"]) > 176]
    assert long  # cut in the list, whole in the store


def test_rerun_over_complete_store_requests_no_detail_or_photo(full_crawl):
    store, _ = full_crawl
    with serve(ARCHIVE) as portal:
        rc, stats = crawl(portal.url, store, settings=FAST)
    assert rc == 0
    assert hs(stats, "rulings_skipped_stored") == 955 and hs(stats, "rulings_stored") == 0
    assert hs(stats, "requests/detail") == 0 and hs(stats, "requests/photo") == 0
    assert portal.counts["detail"] == 0 and portal.counts["photo"] == 0


@pytest.mark.slow
@needs_archive
def test_faults_same_end_state_after_at_most_one_rerun(tmp_path):
    """Error envelopes, 500s, slow answers (past the timeout), cut photo bodies, repeated items; small pages so
    the year ranges are split."""
    store, years = tmp_path / "store", {"start": "2012-01-01", "end": "2012-12-31"}
    settings = {**FAST, "DOWNLOAD_TIMEOUT": 1, "CLIP_PAGE_UNIT": 5, "CLIP_MAX_PAGES": 6}
    runs = []
    with serve(ARCHIVE, faults=0.2, seed=7, slow_s=1.5) as portal:
        for _ in range(2):
            rc, stats = crawl(portal.url, store, settings=settings, args=years, log=tmp_path / "crawl.log")
            assert rc == 0
            runs.append(stats)
            if not hs(stats, "rulings_incomplete") and not any(k.startswith("hsflow/refused/") for k in stats):
                break
    assert_store_matches(store, archive_records("2012-01-01", "2012-12-31"))
    first = runs[0]
    assert first.get("retry/count", 0) > 0 and hs(first, "rulings_repeated") > 0 and hs(first, "list_splits") > 0
    assert sum(first.get(f"retry/reason_count/{r}", 0) for r in ("error_envelope", "500 Internal Server Error")) > 0
    assert portal.counts["list"] > 0


@pytest.mark.slow
@needs_archive
def test_kill_9_mid_crawl_then_rerun(tmp_path):
    store, years = tmp_path / "store", {"start": "2011-01-01", "end": "2011-12-31"}
    slow = {**FAST, "CONCURRENT_REQUESTS": 2, "CONCURRENT_REQUESTS_PER_DOMAIN": 2}
    with serve(ARCHIVE) as portal:
        proc = subprocess.Popen(crawl_command(portal.url, store, settings=slow, args=years), cwd=HERE, env=env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(list((store / "rulings").glob("*.json"))) < 25:
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        done = len(list((store / "rulings").glob("*.json")))
        assert 25 <= done < 85, done  # killed in the middle
        rc, stats = crawl(portal.url, store, settings=FAST, args=years)
    assert rc == 0 and hs(stats, "rulings_skipped_stored") == done
    assert_store_matches(store, archive_records("2011-01-01", "2011-12-31"))


@pytest.mark.slow
@needs_archive
def test_jobdir_pause_and_resume(tmp_path):
    store, job, year = tmp_path / "store", tmp_path / "job", {"start": "2011-01-01", "end": "2011-12-31"}
    settings = {**FAST, "JOBDIR": job, "CONCURRENT_REQUESTS": 4}
    with serve(ARCHIVE) as portal:
        rc, first = crawl(portal.url, store, settings={**settings, "CLOSESPIDER_ITEMCOUNT": 10}, args=year)
        assert rc == 0 and first["finish_reason"] == "closespider_itemcount"
        assert (job / "requests.seen").is_file()
        rc, second = crawl(portal.url, store, settings=settings, args=year)
    assert rc == 0 and second["finish_reason"] == "finished"
    assert second.get("scheduler/dequeued/disk", 0) > 0  # the paused queue was taken up
    assert_store_matches(store, archive_records("2011-01-01", "2011-12-31"))


@pytest.mark.slow
@needs_archive
def test_hostile_data_refused_logged_counted_and_crawl_goes_on(tmp_path):
    """A photo path escaping the store, a non-image, a decompression bomb, malformed detail HTML and list JSON, an
    unsafe ruling number; plus good rulings in all three categories."""
    archive = tmp_path / "archive"
    (archive / "images").mkdir(parents=True)
    records = list(archive_records("2019-01-01", "2019-12-31").values())[:8]
    extra = [dict(records[0], RRDC_NO="9930190000001", category="council"),
             dict(records[1], RRDC_NO="9930190000002", category="committee")]
    for rec in records + extra:
        for name in rec["images"]:
            if not (archive / "images" / name).exists():
                (archive / "images" / name).symlink_to(ARCHIVE / "images" / name)
    (archive / "rulings.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in
                                                   records + extra), encoding="utf-8")
    store, log = tmp_path / "store", tmp_path / "crawl.log"
    with serve(archive, hostile=True) as portal:
        rc, stats = crawl(portal.url, store, settings=FAST, log=log)
    assert rc == 0 and stats["finish_reason"] == "finished"
    records_by_id = {r["rrdc_no"]: r for r in RawStore(store).rulings()}
    good = {r["RRDC_NO"]: r for r in records + extra}
    assert set(good) <= set(records_by_id)
    assert {records_by_id[k]["category"] for k in ("9930190000001", "9930190000002")} == {"council", "committee"}
    # Refused photos are left out of their ruling; broken rulings are not stored; nothing lands outside the store.
    assert len(records_by_id["9990210000001"]["photos"]) == 1
    assert records_by_id["9990210000002"]["photos"] == records_by_id["9990210000003"]["photos"] == []
    assert not {"9990210000004", "9990050000006"} & set(records_by_id)
    assert set(records_by_id) == set(good) | {"9990210000001", "9990210000002", "9990210000003"}
    assert not [p for p in tmp_path.rglob("*") if "escape" in p.name or p.name == "9990210000005.json"]
    for key in ("photo_path", "photo_not_an_image", "photo_image_too_large", "detail_malformed_html", "ruling_id",
                "list_malformed_json"):
        assert hs(stats, f"refused/{key}") == 1, (key, {k: v for k, v in stats.items() if "refused" in k})
    text = log.read_text()
    for rrdc in ("9990210000001", "9990210000002", "9990210000003", "9990210000004", "../9990210000005"):
        assert any("refused" in line and rrdc in line for line in text.splitlines()), rrdc
    assert RawStore(store).info()["undecodable_photos"] == 0


def test_bomb_is_small_on_disk_and_huge_decoded():
    from hsflow.core.images import PhotoError, open_rgb

    data = bomb_png()
    assert len(data) < 100_000
    with pytest.raises(PhotoError, match="too large"):
        open_rgb(data)


@pytest.mark.slow
def test_crawl_of_a_raw_store_gives_back_its_records(tiny_store, tmp_path):
    """What `make crawl-demo` does, on a few rulings of the shipped demo: the crawl reproduces the records."""
    with serve(tiny_store) as portal:
        rc, stats = crawl(portal.url, tmp_path / "store", settings=FAST)
    assert rc == 0
    theirs = {r["rrdc_no"]: r for r in RawStore(tiny_store).rulings()}
    ours = {r["rrdc_no"]: r for r in RawStore(tmp_path / "store").rulings()}
    assert set(ours) == set(theirs) and hs(stats, "photos_stored") == sum(len(r["photos"]) for r in ours.values())
    for rrdc, rec in ours.items():
        want = dict(theirs[rrdc], fields={k: v for k, v in theirs[rrdc]["fields"].items() if k != "source_class"})
        assert dict(rec, fields={k: v for k, v in rec["fields"].items() if k != "DOCID"}) == want
    for p in (tmp_path / "store" / "photos").iterdir():
        assert p.read_bytes() == (tiny_store / "photos" / p.name).read_bytes()


def test_standin_serves_a_raw_store_too():
    rulings, files = load(DEMO_STORE)
    assert len(rulings) == 955 and len(files) == 2936 and all(r.category == "rulings" for r in rulings)


# -- offline-quiet: the portal's host and nothing else (the guard: conftest.net_guard) ------------------------
def guarded_env(tmp_path: Path) -> tuple[dict, Path]:
    """The crawl's environment with the network guard, a fresh tldextract cache (a cached suffix list would hide a
    fetch) and no tldextract setting of the caller's."""
    guard, log = net_guard(tmp_path)
    base = {k: v for k, v in env().items() if not k.startswith("TLDEXTRACT")}
    return {**base, **guard, "TLDEXTRACT_CACHE": str(tmp_path / "tldextract")}, log


@pytest.mark.slow
def test_the_guard_sees_a_public_suffix_fetch(tmp_path):
    """The guard is not blind: tldextract left to its defaults reaches for the internet, and the guard names it."""
    e, log = guarded_env(tmp_path)
    subprocess.run([sys.executable, "-c", "import tldextract; tldextract.TLDExtract()('a.example.com')"], env=e,
                   capture_output=True, timeout=120)
    assert hosts(log) - LOCAL, "the guard recorded no lookup of the public-suffix list's host"


@pytest.mark.slow
def test_crawl_reaches_the_portal_only_and_logs_no_traceback(tiny_store, tmp_path):
    """A normal `scrapy crawl` at LOG_LEVEL=WARNING: every lookup and connection goes to the portal's host (the
    public-suffix list comes from tldextract's bundled snapshot), and the log holds no traceback."""
    e, log = guarded_env(tmp_path)
    with serve(tiny_store) as portal:
        proc = subprocess.run(crawl_command(portal.url, tmp_path / "store", settings={**FAST, "LOG_LEVEL": "WARNING"}),
                              cwd=HERE, env=e, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert len(RawStore(tmp_path / "store").ruling_ids()) == len(RawStore(tiny_store).ruling_ids())
    seen = hosts(log)
    assert "127.0.0.1" in seen  # the guard saw the portal's connections
    assert seen <= LOCAL, f"the crawl reached beyond the portal: {sorted(seen - LOCAL)}"
    assert "Traceback" not in out and "ERROR" not in out, out[-3000:]
