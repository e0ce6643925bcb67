"""Cross-fitted thresholds? An offline experiment on the feature cache (issue 25, third round).

    .venv/bin/python studies/crossfit_eval.py [--seeds 42 43 44]

make train fits the unknown and review thresholds on 2018 as answered by the model trained before 2018, then refits
on training + 2018: the shipped model is more at home in the later photo collection than the one that vouched for
it, so the thresholds are stricter than they need be on 2019 (61 % answered, all right). Cross-fitting: 2018's
rulings in two halves; each half answered by a head (and Gaussians) that learned training + the other half. Each
variant's thresholds are then applied to the final model (training + all of 2018), scored on 2019 and on photos of
held-out codes (none / CHOICE / REPORT, studies/common.py). Output: studies/crossfit_eval.json; read in
docs/unknown.md (not adopted).
"""
from __future__ import annotations

import argparse
import json
import sys
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # hsflow and studies.common from this checkout

import numpy as np  # noqa: E402
import torch  # noqa: E402

from hsflow.models import calibration, unknown  # noqa: E402
from studies import common  # noqa: E402


def scored(head, gauss_x, gauss_y, x):
    """rmd of x under Gaussians of (gauss_x, gauss_y), and the head's logits of x."""
    g = unknown.UnknownScorer("rmd", 0.0, unknown.gaussians(gauss_x, gauss_y))  # hsflow's defaults
    with torch.no_grad():
        lg = head(torch.as_tensor(x)).numpy()
    return g.rmd(x), lg


def run(feats, samples, classes, held: set[str], seed: int) -> dict:
    lo = common.LeftOut(feats, samples, classes, held)
    keep, orig, ys = lo.known, lo.orig, lo.y
    tm, tom = keep["train"], keep["train"] & orig["train"]
    vm, sm = keep["val"] & orig["val"], keep["test"] & orig["test"]
    tx, ty = feats["train"][tm], torch.as_tensor(ys("train", tm))
    gx, gy = feats["train"][tom].numpy(), ys("train", tom)
    vx, vy = feats["val"][vm].numpy(), ys("val", vm)
    sx, sy = feats["test"][sm].numpy(), ys("test", sm)
    hx = lo.heldout().numpy() if held else np.zeros((0, vx.shape[1]), np.float32)
    rulings = [s.rrdc_no for s, k in zip(samples["val"], vm) if k]
    half = np.array([zlib.crc32(r.encode()) % 2 for r in rulings])
    n = lo.classes
    # final model: training + all of 2018
    final = common.train_head(torch.cat([tx, torch.as_tensor(vx)]), torch.cat([ty, torch.as_tensor(vy)]), n,
                              seed=seed)
    fgx, fgy = np.concatenate([gx, vx]), np.concatenate([gy, vy])
    out, cal = {}, common.calibration_settings()
    # reference answers on 2018: "before" (train only) and "crossfit" (train + the other half)
    head0 = common.train_head(tx, ty, n, seed=seed)
    refs = {"before": scored(head0, gx, gy, vx)}
    rmd_cf, lg_cf = np.zeros(len(vx), np.float32), np.zeros((len(vx), n), np.float32)
    for h in (0, 1):
        other = half != h
        hh = common.train_head(torch.cat([tx, torch.as_tensor(vx[other])]),
                               torch.cat([ty, torch.as_tensor(vy[other])]), n, seed=seed)
        r, lg = scored(hh, np.concatenate([gx, vx[other]]), np.concatenate([gy, vy[other]]), vx[half == h])
        rmd_cf[half == h], lg_cf[half == h] = r, lg
    refs["crossfit"] = (rmd_cf, lg_cf)
    final_gauss = unknown.gaussians(fgx, fgy)  # hsflow's defaults
    with torch.no_grad():
        s_lg, h_lg = final(torch.as_tensor(sx)).numpy(), final(torch.as_tensor(hx)).numpy()
    for name, (v_rmd, v_lg) in refs.items():
        t = common.temperature(v_lg, vy)
        scorer = common.fused(final_gauss, v_rmd, v_lg, t)  # make train's fused score, this reference's quantiles
        v_score, s_score, h_score = scorer.reference["score"], scorer.score(sx, s_lg), scorer.score(hx, h_lg)
        vp, sp_, hp = unknown.softmax(v_lg, t), unknown.softmax(s_lg, t), unknown.softmax(h_lg, t)
        right = sp_.argmax(1) == sy
        for rate in (0.0, 0.1, 0.2):
            u = unknown.fit_threshold(v_score, rate) if rate else np.inf
            for delta in (0.1, 0.2):
                r = calibration.fit_review_threshold(vp, vy, {**cal, "delta": delta}, None, v_score <= u)
                ok = calibration.unflagged(sp_.max(1), r, s_score > u)
                hok = calibration.unflagged(hp.max(1), r, h_score > u) if len(hx) else np.zeros(0, bool)
                vok = calibration.unflagged(vp.max(1), r, v_score > u)
                out[f"{name}_u{rate}_d{delta}"] = {
                    "T": round(t, 3), "review": float(r), "val_cov": float(vok.mean()),
                    "val_prec": float((vp.argmax(1) == vy)[vok].mean()) if vok.any() else None,
                    "cov2019": float(ok.mean()), "prec2019": float(right[ok].mean()) if ok.any() else None,
                    "unknown2019": float((s_score > u).mean()),
                    "held_unflagged": float(hok.mean()) if len(hx) else None}
    out["top1_2019"] = float((s_lg.argmax(1) == sy).mean())
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    args = ap.parse_args()
    feats, samples, classes, cfg, _ = common.features([])
    sets = {"full": set(), "choice": set(common.choice_codes(Path(cfg.paths.raw_store))), "report": set(common.REPORT)}
    result = {}
    for name, held in sets.items():
        for seed in args.seeds:
            r = result[f"{name}_{seed}"] = run(feats, samples, classes, held, seed)
            for k, v in r.items():
                if isinstance(v, dict) and "_d0.2" in k:
                    print(name, seed, k, json.dumps(v), flush=True)
            (ROOT / "studies" / "crossfit_eval.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
