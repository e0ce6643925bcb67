"""The review page in a real headless browser: Debian's Chromium driven by Selenium uploads a real photo and a
corrupt one to `python -m hsflow.review` (uvicorn) and reads what the page shows; the request limits over HTTP."""
import base64
import http.client
import json
import os
import shutil
import urllib.error
import urllib.request
from unittest import mock

import pytest

from conftest import PY, Server, free_port
from hsflow.core import hs
from hsflow.serving import recommend as R

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
needs_chromium = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="no Chromium here: `apt-get install "
                                    "chromium chromium-driver` (.ci/run does) for the browser test")


@pytest.fixture(scope="module")
def page(tiny_run):
    port = free_port()
    server = Server([PY, "-m", "hsflow.review", "--model", f"runs:/{tiny_run['run_id']}/model", "--port", str(port)],
                    f"http://127.0.0.1:{port}", "/api/model", env={"MLFLOW_TRACKING_URI": tiny_run["tracking_uri"]})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser():
    pytest.importorskip("selenium", reason="pip install selenium (the test extra) for the browser test")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1200,1300"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    yield driver
    driver.quit()


def upload(driver, url: str, files) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url + "/")
    driver.find_element(By.ID, "files").send_keys("\n".join(str(f) for f in files))
    driver.find_element(By.ID, "go").click()
    WebDriverWait(driver, 120).until(lambda d: d.find_element(By.ID, "status").text in ("done", "failed"))


@needs_chromium
def test_page_shows_codes_bars_flag_precedents_and_the_bad_file(browser, page, tiny_run, tmp_path):
    from selenium.webdriver.common.by import By

    photo = sorted((tiny_run["store"] / "photos").glob("0808100000_*"))[0]
    good = tmp_path / "apple.jpg"
    good.write_bytes(photo.read_bytes())
    bad = tmp_path / "corrupt.jpg"
    bad.write_bytes(photo.read_bytes()[: photo.stat().st_size // 2])
    upload(browser, page.url, [good, bad])

    with mock.patch.dict(os.environ, {"MLFLOW_TRACKING_URI": tiny_run["tracking_uri"]}):
        model = R.load(f"runs:/{tiny_run['run_id']}/model")
    expected = R.recommend(model, [good])[0]  # the CLI's answer for the same photo

    errors = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#errors .photo-error")]
    assert len(errors) == 1 and errors[0].startswith("corrupt.jpg: cannot decode"), errors
    (answer,) = browser.find_elements(By.CSS_SELECTOR, ".answer")
    assert "1 photo: apple.jpg" in answer.find_element(By.TAG_NAME, "h2").text
    rows = answer.find_elements(By.CSS_SELECTOR, "tr.candidate")
    assert [r.find_element(By.CSS_SELECTOR, ".code").text for r in rows] == [
        hs.display(c["hs_code"]) for c in expected.candidates]
    top = expected.candidates[0]
    assert top["description"] in rows[0].text and top["heading"] in rows[0].text and top["chapter"] in rows[0].text
    assert rows[0].find_element(By.CSS_SELECTOR, ".prob").text == f"{100 * top['probability']:.1f}%"
    width = rows[0].find_element(By.CSS_SELECTOR, ".bar span").get_attribute("style")
    assert f"{100 * top['probability']:.1f}%" in width
    flag = answer.find_element(By.ID, "review-flag").text
    assert flag == {"answer": "confident", "needs_review": "needs review",
                    "unknown": "unknown: not like any trained product"}[expected.outcome]

    cards = answer.find_elements(By.CSS_SELECTOR, ".precedent")
    assert len(cards) == len(expected.precedents) == 3
    for card, p in zip(cards, expected.precedents):
        assert f"ruling {p['rrdc_no']}" in card.text and p["date"] in card.text and hs.display(p["hs_code"]) in card.text
        img = card.find_element(By.TAG_NAME, "img")
        assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img) == 96
    assert bool(answer.find_elements(By.ID, "disagree")) == (expected.precedent_agrees is False)

    shot = tmp_path / "review.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 20_000
    if os.environ.get("HSFLOW_REVIEW_SCREENSHOT"):  # docs: keep a copy where asked
        shutil.copy(shot, os.environ["HSFLOW_REVIEW_SCREENSHOT"])

    # Only a corrupt file: its error and "no usable photo", and the page takes the next upload as before.
    upload(browser, page.url, [bad])
    texts = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".photo-error")]
    assert len(texts) == 2 and "no usable photo" in texts[1]
    upload(browser, page.url, [good])
    assert len(browser.find_elements(By.CSS_SELECTOR, ".answer tr.candidate")) == 3
    assert not browser.find_elements(By.CSS_SELECTOR, ".photo-error")


def post(url: str, body: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(url + "/api/recommend", body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_uploads_are_limited_in_size_count_and_type(page, tiny_run):
    from hsflow.serving.review import MAX_PHOTO_BYTES, MAX_PHOTOS

    photo = sorted((tiny_run["store"] / "photos").glob("0401200000_*"))[0]
    data = base64.b64encode(photo.read_bytes()).decode()
    big = base64.b64encode(b"\xff" * (MAX_PHOTO_BYTES + 1)).decode()
    status, body = post(page.url, json.dumps({"photos": [
        {"name": "milk.jpg", "type": "image/jpeg", "data": data},
        {"name": "notes.txt", "type": "text/plain", "data": base64.b64encode(b"hello").decode()},
        {"name": "huge.jpg", "type": "image/jpeg", "data": big}]}).encode())
    assert status == 200
    errors = [r["error"] for r in body["results"] if r["error"]]
    assert errors[0].startswith("notes.txt: not an accepted type (text/plain)")
    assert errors[1].startswith("huge.jpg: too large (10.0 MB")
    assert [r["images"] for r in body["results"] if not r["error"]] == [["milk.jpg"]]
    status, body = post(page.url, json.dumps({"photos": [{"name": "a.jpg", "data": data}] * (MAX_PHOTOS + 1)}).encode())
    assert status == 400 and f"1 to {MAX_PHOTOS} photos" in body["error"]
    status, body = post(page.url, b"{not json")
    assert status == 400 and "photos" in body["error"]
    # A body announced larger than the limits is refused from its header, before it is read.
    host, port = page.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.putrequest("POST", "/api/recommend")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(MAX_PHOTOS * (MAX_PHOTO_BYTES * 4 // 3 + 1024) + 8192))
    conn.endheaders(b"{")
    resp = conn.getresponse()
    assert resp.status == 413 and "too large" in json.loads(resp.read())["error"]
    conn.close()
