"""studies/: every study shares only studies/common.py and hsflow (no study imports another, none reaches bench/),
and common.py's pieces are hsflow's own: the same head, temperature, fused score, masks and run line."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hsflow.data.builder import Sample, leave_codes_out
from hsflow.models import calibration, unknown
from hsflow.models.classifier import build_head
from hsflow.training.train import last_line, parse_last_line
from studies import common

ROOT = Path(__file__).resolve().parents[1]
STUDIES = sorted((ROOT / "studies").glob("*.py"))
NAMES = {p.stem for p in STUDIES} - {"common"}


def _imported(tree: ast.Module) -> set[str]:
    """Every module an import names, `from studies import x` as studies.x."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.name)
def test_a_study_imports_no_other_study_and_never_reaches_bench(path):
    tree = ast.parse(path.read_text(), str(path))
    imported = _imported(tree)
    others = {n for n in NAMES if n != path.stem}
    assert not imported & (others | {f"studies.{n}" for n in others}), f"{path.name} imports another study"
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            call = ast.unparse(node.func)
            text = ast.unparse(node)
            assert not (call.startswith("sys.path.") and ("bench" in text or "studies" in text)), \
                f"{path.name}: {text} (import hsflow and studies.common from the checkout's root only)"
            assert "spec_from_file_location" not in call and not call.startswith("runpy."), f"{path.name}: {text}"


def test_the_held_out_code_sets_are_the_recorded_ones():
    recorded = json.loads((ROOT / "studies" / "safety_results.json").read_text())
    assert common.REPORT == recorded["report_codes"] == common.median_code_per_chapter(ROOT / "data" / "demo")
    assert common.choice_codes(ROOT / "data" / "demo") == recorded["choice_codes"]
    assert common.exclude_override(["0101000000", "0202000000"]) == 'dataset.exclude_codes=["0101000000","0202000000"]'


def test_leave_codes_out_masks_and_relabels():
    classes = ["0101000000", "0202000000", "0303000000"]
    samples = [Sample("a", "", "r1", 0, "train"), Sample("b", "", "r1", 1, "train"),
               Sample("c", "", "r2", 2, "train", view=1), Sample("d", "", "r3", 1, "train", view=2)]
    known, orig, labels = leave_codes_out(samples, classes, {"0202000000"})
    assert known == [True, False, True, False] and orig == [True, True, False, False] and labels == [0, -1, 1, -1]
    lo = common.LeftOut({"train": torch.arange(4.0)[:, None]}, {"train": samples}, classes, {"0202000000"})
    assert lo.classes == 2 and lo.y("train", lo.known["train"]).tolist() == [0, 1]
    assert lo.heldout(("train",)).tolist() == [[1.0]]  # the held code's original only
    assert lo.heldout(("train",), originals=False).tolist() == [[1.0], [3.0]]


def test_the_run_line_reads_back_and_a_wrong_one_is_named():
    out = "some progress\n" + last_line({"run_id": "ab" * 16, "test_top1": 0.87921}) + "\n"
    assert parse_last_line(out) == {"run_id": "ab" * 16, "test_top1": 0.8792}
    with pytest.raises(ValueError, match="no 'run_id=... test_top1=...' line.*error: boom"):
        parse_last_line("run_id=x test_top1=0.1\nerror: boom")


def test_the_study_head_is_make_trains_head():
    cfg = common.recommended()
    x, y = torch.randn(40, 16), torch.arange(40) % 3
    head = common.train_head(x, y, 3, epochs=0, seed=7)
    torch.manual_seed(7)
    ref = build_head(16, 3, int(cfg.model.head.hidden), float(cfg.model.head.dropout))
    assert str(head) == str(ref)
    assert all(torch.equal(a, b) for a, b in zip(head.state_dict().values(), ref.state_dict().values()))
    assert common.calibration_settings() == {"method": str(cfg.calibration.method), "delta": float(
        cfg.calibration.delta), "target_precision": float(cfg.calibration.target_precision)}


def test_the_study_temperature_is_make_trains():
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(60, 4, generator=g) * 3, torch.randint(0, 4, (60,), generator=g)
    assert common.temperature(logits.numpy(), labels.numpy()) == calibration.fit_temperature(logits, labels)


def test_the_fused_score_of_a_chosen_reference_is_unknown_fits():
    rng = np.random.default_rng(0)
    gx, gy = rng.normal(size=(60, 8)).astype(np.float32), np.arange(60) % 3
    vx, v_lg, qx, q_lg = rng.normal(size=(20, 8)), rng.normal(size=(20, 3)), rng.normal(size=(9, 8)), \
        rng.normal(size=(9, 3))
    fitted = unknown.fit(gx, gy, vx, v_lg, 1.5, "rmd_msp", 0.1)
    mine = common.fused(unknown.gaussians(gx, gy), fitted.reference["rmd"], v_lg, 1.5)
    np.testing.assert_allclose(mine.reference["score"], fitted.reference["score"], rtol=1e-6)
    np.testing.assert_allclose(mine.score(qx, q_lg), fitted.score(qx, q_lg), rtol=1e-6)


def _tiny_cache(views: bool = False):
    """4 codes, 3 splits, random features: enough for every offline study to run its whole protocol."""
    classes = ["0101000000", "0102000000", "0201000000", "0202000000"]
    rng, samples, feats = np.random.default_rng(1), {}, {}
    for sp, n in (("train", 48), ("val", 24), ("test", 24)):
        samples[sp] = [Sample(f"{sp}{i}", "", f"r{sp}{i // 2}", i % 4, sp, view=(i // 4) % 2 if sp == "train" else 0)
                       for i in range(n)]
        x = rng.normal(size=(n, 8)).astype(np.float32) + np.eye(4, 8, dtype=np.float32)[[s.label for s in
                                                                                         samples[sp]]] * 2
        feats[sp] = torch.from_numpy(np.stack([x, x[:, ::-1].copy()], 1) if views and sp != "train" else x)
    return feats, samples, classes


def test_the_offline_studies_run_their_protocol_on_a_tiny_cache(monkeypatch):
    """Smoke: each refactored study's core on random features (2 epochs): it runs and gives figures in range."""
    from studies import accuracy_candidates, crossfit_eval, safety_frontier, unknown_sweep

    epochs = common.train_head.__defaults__
    monkeypatch.setattr(common.train_head, "__defaults__", (2, *epochs[1:]))
    feats, samples, classes = _tiny_cache()
    held = {"0202000000"}
    sweep = unknown_sweep.one_setting(feats, samples, classes, held, "test", True)
    assert 0 <= sweep["rmd_l2_pca256_s0.1+msp"] <= 1 and sweep["held_photos"] == 18  # 6 originals of the held code per split
    cross = crossfit_eval.run(feats, samples, classes, held, 42)
    assert 0 <= cross["crossfit_u0.1_d0.2"]["cov2019"] <= 1
    a = safety_frontier.arrays(feats, samples, classes, held)
    ans = safety_frontier.answers(a, 42, {"epochs": 2})
    assert set(safety_frontier.rules(ans, ["all", "fused_rank"])) >= {"shipped", "fused_rank"}
    feats3, _, _ = _tiny_cache(views=True)
    acc = accuracy_candidates.one(feats3, samples, classes, held, 42, 8, True)
    assert 0 <= acc[True]["top1_2019"] <= 1 and 0 <= acc[False]["held_unflagged"] <= 1
