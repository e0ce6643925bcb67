"""The study's dataset variants over the shipped demo: counts per class per split, leak-free splits, quality rules."""
import collections
import hashlib
import json
import shutil

import pytest
from PIL import Image, ImageFilter

from conftest import DEMO, make_tiny_store
from hsflow.data.builder import build_dataset, spec_summary
from hsflow.data.quality import near_duplicate_clusters, photo_stats
from hsflow.data.store import RawStore
from test_configs import compose_cfg

TOP5 = ["0401200000", "0403200000", "0702000000", "0709600000", "0808100000"]
CH08 = ["0805500000", "0807190000", "0808100000", "0808300000", "0899999999"]


@pytest.fixture(scope="module")
def stats_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("stats")


def build(name, cache, *overrides):
    cfg = compose_cfg(f"dataset={name}", *overrides)
    return build_dataset(cfg.dataset, DEMO, cache_dir=cache, verbose=False)


def per_class(spec, split, generated=None):
    out = collections.Counter()
    for s in spec.split(split):
        if generated is None or bool(s.view) == generated:
            out[spec.classes[s.label]] += 1
    return dict(out)


def assert_leak_free(spec):
    """No ruling and no near-duplicate cluster has photos on two sides of the split line."""
    side_of_ruling = collections.defaultdict(set)
    side_of_path = {}
    for s in spec.samples:
        side_of_ruling[s.rrdc_no].add(s.split)
        side_of_path[s.path.rsplit("/", 1)[-1]] = s.split
    assert all(len(v) == 1 for v in side_of_ruling.values())
    for cluster in spec.near_duplicates:
        assert len({side_of_path[f] for f in cluster if f in side_of_path}) <= 1, cluster


def test_demo_top5_counts(stats_cache):
    spec = build("demo_top5", stats_cache)
    assert spec.classes == TOP5
    assert per_class(spec, "train", generated=False) == dict.fromkeys(TOP5, 60)
    assert per_class(spec, "train", generated=True) == dict.fromkeys(TOP5, 300)  # 60 -> 360 per code
    assert per_class(spec, "test") == dict.fromkeys(TOP5, 30)  # untouched originals
    assert all(n <= 15 for n in per_class(spec, "val").values())
    assert_leak_free(spec)


def test_demo_ch08_imbalanced_counts(stats_cache):
    spec = build("demo_ch08_imbalanced", stats_cache)
    assert spec.classes == CH08  # 4 largest codes of chapter 08 + the catch-all
    train, test = per_class(spec, "train"), per_class(spec, "test")
    assert sum(train.values()) + sum(per_class(spec, "val").values()) + sum(test.values()) == 1253
    assert train["0899999999"] > train["0808100000"] > train["0805500000"]  # imbalanced, as in the study
    for code in CH08:  # 7:3 by ruling, per class
        assert 0.25 <= test[code] / (test[code] + train[code] + per_class(spec, "val")[code]) <= 0.35
    assert not any(s.view for s in spec.samples)
    assert_leak_free(spec)


def test_demo_ch08_balanced_counts_and_the_test_fill_option(stats_cache):
    spec = build("demo_ch08_balanced", stats_cache)
    assert per_class(spec, "train") == dict.fromkeys(CH08, 150)  # originals first, generated copies to fill
    assert "0808100000" not in per_class(spec, "train", generated=True)  # enough originals: none generated
    assert per_class(spec, "train", generated=True)["0805500000"] > 0
    test = per_class(spec, "test")
    assert all(n <= 60 for n in test.values()) and not any(s.view for s in spec.split("test"))
    assert spec.removed["blurry"] > 0  # the quality filter removed something, and says how much
    assert_leak_free(spec)

    filled = build("demo_ch08_balanced", stats_cache, "dataset.test_fill_with_generated=true")
    assert per_class(filled, "test") == dict.fromkeys(CH08, 60)  # the study's protocol: generated copies in test
    assert per_class(filled, "test", generated=False) == test  # the same originals underneath
    assert per_class(filled, "train") == per_class(spec, "train")


def test_split_is_identical_across_backbones_and_epochs(stats_cache):
    a = compose_cfg("dataset=demo_ch08_balanced", "model=efficientnet_lite0", "trainer.max_epochs=100")
    b = compose_cfg("dataset=demo_ch08_balanced", "model=efficientnet_lite2", "trainer.max_epochs=150")
    sa = build_dataset(a.dataset, DEMO, cache_dir=stats_cache, verbose=False)
    sb = build_dataset(b.dataset, DEMO, cache_dir=stats_cache, verbose=False)
    assert sa.fingerprint() == sb.fingerprint() and sa.samples == sb.samples
    assert spec_summary(sa)["fingerprint"] != spec_summary(build("demo_top5", stats_cache))["fingerprint"]


def _copy_photo_into(store, src_rec, dst_rec_path, new_name):
    """Give ruling `dst` a copy of one of `src`'s photos (a near-duplicate across rulings)."""
    rec = json.loads(dst_rec_path.read_text())
    src = src_rec["photos"][0]
    shutil.copy(store / "photos" / src["file"], store / "photos" / new_name)
    rec["photos"].append({**src, "file": new_name})
    dst_rec_path.write_text(json.dumps(rec))


def test_near_duplicates_never_straddle_the_split(tmp_path):
    store = make_tiny_store(tmp_path / "store", {"0808100000": 20})
    paths = sorted((store / "rulings").glob("*.json"))
    recs = [json.loads(p.read_text()) for p in paths]
    # Copy a photo of every ruling into the next one: a chain that links all rulings of the class.
    for i in range(len(paths) - 1):
        _copy_photo_into(store, recs[i], paths[i + 1], f"0808100000_{recs[i + 1]['rrdc_no']}_dup{i}.jpg")
    by_ruling = ("dataset.split.by=ruling", "dataset.split.train=0.5", "dataset.split.val=0.2",
                 "dataset.split.test=0.3")
    spec = build_dataset(compose_cfg(*by_ruling).dataset, store, cache_dir=tmp_path, verbose=False)
    assert spec.near_duplicates  # found ...
    assert len({s.split for s in spec.samples}) == 1  # ... and the linked rulings all went to one side
    off = build_dataset(compose_cfg(*by_ruling, "dataset.quality.near_duplicates.max_distance=null").dataset, store,
                        cache_dir=tmp_path, verbose=False)
    assert len({s.split for s in off.samples}) == 3  # without the rule the same rulings do straddle


def test_a_near_duplicate_with_two_codes_keeps_only_the_majority_code(tmp_path):
    store = make_tiny_store(tmp_path / "store", {"0808100000": 3, "0401200000": 3})
    apple = json.loads(sorted((store / "rulings").glob("*.json"))[-1].read_text())
    milk_path = sorted((store / "rulings").glob("*.json"))[0]
    assert apple["hs_code"] == "0808100000" and json.loads(milk_path.read_text())["hs_code"] == "0401200000"
    _copy_photo_into(store, apple, milk_path, "0401200000_conflict_1.jpg")
    spec = build_dataset(compose_cfg().dataset, store, cache_dir=tmp_path, verbose=False)
    assert spec.removed["near_duplicate_conflict"] >= 1
    files = {s.path.rsplit("/", 1)[-1] for s in spec.samples}
    assert not ({apple["photos"][0]["file"], "0401200000_conflict_1.jpg"} <= files)


def test_quality_rules_remove_small_and_blurry_photos(tmp_path):
    store = make_tiny_store(tmp_path / "store", {"0808100000": 6})
    photos = sorted((store / "photos").iterdir())
    Image.open(photos[0]).filter(ImageFilter.GaussianBlur(8)).save(photos[0], "JPEG")
    Image.open(photos[1]).resize((40, 30)).save(photos[1], "JPEG")
    for p in (store / "rulings").glob("*.json"):  # keep the records' sizes and hashes true to the files
        rec = json.loads(p.read_text())
        for ph in rec["photos"]:
            if ph["file"] in (photos[0].name, photos[1].name):
                data = (store / "photos" / ph["file"]).read_bytes()
                w, h = Image.open(store / "photos" / ph["file"]).size
                ph.update(sha256=hashlib.sha256(data).hexdigest(), width=w, height=h)
        p.write_text(json.dumps(rec))
    cfg = compose_cfg("dataset.quality.min_side=64", "dataset.quality.min_sharpness=60")
    spec = build_dataset(cfg.dataset, store, cache_dir=tmp_path, verbose=False)
    assert spec.removed["min_side"] == 1 and spec.removed["blurry"] >= 1
    kept = {s.path for s in spec.samples}
    assert str(photos[0]) not in kept and str(photos[1]) not in kept


def test_photo_stats_are_cached_by_content(tmp_path):
    photos = [p for p in RawStore(DEMO).photos()][:5]
    first = photo_stats(photos, tmp_path, verbose=False)
    assert (tmp_path / "photo_stats.json").is_file() and set(first) == {p.sha256 for p in photos}
    assert photo_stats(photos, tmp_path, verbose=False) == first
    assert near_duplicate_clusters(photos + photos[:1], first, 0)  # an exact copy is a near-duplicate


def test_test_fill_needs_a_size(stats_cache):
    with pytest.raises(ValueError, match="fill.test"):
        build("demo_ch08_imbalanced", stats_cache, "dataset.test_fill_with_generated=true")


# --- the dated split (dataset=demo's default) -----------------------------------------------------------------------

def _dates(store):
    return {r["rrdc_no"]: r["fields"]["ENFR_DT"] for r in RawStore(store).rulings()}


def test_dated_split_keeps_time_order_on_the_demo(stats_cache):
    spec = build("demo", stats_cache)
    dates = _dates(DEMO)
    for s in spec.samples:
        d = dates[s.rrdc_no]
        assert (s.split == "train") == (d < "2018-01-01") and (s.split == "test") == (d >= "2019-01-01"), (s, d)
    assert spec_summary(spec)["photos"] == {"train": 2640, "val": 147, "test": 149}
    assert spec.protocol.startswith("date:") and build("demo_top5", stats_cache).protocol.startswith("ruling:")
    assert_leak_free(spec)


def test_dated_split_moves_a_look_alike_forward_never_back(tmp_path):
    """A near-duplicate linking a 2007 ruling to a 2019 one: both go to test; nothing dated after a cut trains."""
    store = make_tiny_store(tmp_path / "store", {"0808100000": 6})
    paths = sorted((store / "rulings").glob("*.json"))
    recs = {p: json.loads(p.read_text()) for p in paths}
    late = [p for p in paths if recs[p]["fields"]["ENFR_DT"] >= "2019"][0]
    early = paths[0]
    _copy_photo_into(store, recs[late], early, f"0808100000_{recs[early]['rrdc_no']}_dup.jpg")
    spec = build_dataset(compose_cfg().dataset, store, cache_dir=tmp_path, verbose=False)
    side = {s.rrdc_no: s.split for s in spec.samples}
    assert side[recs[early]["rrdc_no"]] == "test" == side[recs[late]["rrdc_no"]]
    dates = _dates(store)
    assert all(dates[s.rrdc_no] < "2018-01-01" for s in spec.split("train"))


def test_a_cut_that_empties_a_period_fails_before_decoding(tmp_path, monkeypatch):
    import hsflow.data.builder as builder

    def no_decoding(*a, **k):
        raise AssertionError("photos were decoded before the cut dates were checked")

    monkeypatch.setattr(builder, "usable_photos", no_decoding)
    cfg = compose_cfg("dataset.split.cuts=[2018-01-01,2030-01-01]")
    with pytest.raises(ValueError, match=r"leave the test period empty \(rulings dated 2007-.* \.\. 2019-"):
        build_dataset(cfg.dataset, DEMO, cache_dir=tmp_path, verbose=False)
    with pytest.raises(ValueError, match="split.cuts"):
        build_dataset(compose_cfg("dataset.split.cuts=[2019-01-01,2018-01-01]").dataset, DEMO, cache_dir=tmp_path)


@pytest.mark.parametrize("name, twin", [("ch87_imbalanced", "demo_ch08_imbalanced"),
                                        ("ch87_balanced", "demo_ch08_balanced")])
def test_a_study_variant_that_selects_nothing_fails_before_decoding(name, twin, tmp_path, monkeypatch):
    """The shipped demo has no chapter 87: one line with the cause, the crawl that fetches such rulings and the
    demo twin, from the ruling records alone (no photo decoded, no quality rule run)."""
    import hsflow.data.builder as builder

    def no_decoding(*a, **k):
        raise AssertionError("photos were decoded before the selection was checked")

    monkeypatch.setattr(builder, "usable_photos", no_decoding)
    with pytest.raises(ValueError) as exc:
        build(name, tmp_path)
    line = str(exc.value)
    assert "\n" not in line and f"dataset {name} selects no photos" in line and "no ruling of chapter 87" in line
    assert "scrapy crawl clip_rulings" in line and "paths.raw_store=" in line and f"dataset={twin}" in line
    assert builder.selected_photos(compose_cfg(f"dataset={twin}").dataset, RawStore(DEMO))  # the twin selects here


def test_a_demo_variant_that_selects_nothing_names_no_twin(tmp_path):
    with pytest.raises(ValueError, match=r"no ruling of chapter 99 \(it holds chapters 04, .*scrapy crawl") as exc:
        build("demo_ch08_imbalanced", tmp_path, "dataset.chapter='99'")
    assert "dataset=" not in str(exc.value)
