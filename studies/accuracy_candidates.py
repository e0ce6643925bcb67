"""Spending the runtime's savings on accuracy (issue 26, part 5): which candidate, chosen on 2018 under the safety rule?

    .venv/bin/python studies/accuracy_candidates.py [--seeds 42 43 44]    # extracts Lite0+1+2 and mirrors once (~5 min)

Candidates on the feature cache, each a head like make train's (hidden 512, dropout 0.5, AdamW, cosine, label
smoothing 0.1, 2 generated copies, 20 epochs): make train's Lite1 + Lite0 join (the baseline), the three offline
networks joined (Lite1 + Lite0 + Lite2, one 240 px crop), and each with the test-time mirror averaged (`tta`).
Chosen on 2018 (the model trained before 2018): top-1 and its paired difference with the baseline over rulings, and
the safety rule of issue 25 — with the CHOICE codes held out of training, the share of their photos answered with
neither flag (review bound at 80 %, unknown threshold at 10 % of 2018) must not rise. 2019 (the model refit on
training + 2018) and the REPORT codes are read beside, never chosen on. Output: studies/accuracy_candidates.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # hsflow and studies.common from this checkout

import numpy as np  # noqa: E402
import torch  # noqa: E402

from hsflow.models import calibration, unknown  # noqa: E402
from hsflow.training import evaluation  # noqa: E402
from studies import common  # noqa: E402

BASE_DIM = 2560  # Lite1 (1,280) + Lite0 (1,280): the first columns of the three-way join


def logits_of(head, x: torch.Tensor, tta: bool) -> np.ndarray:
    """x: (photos, views, dim) for val/test (view 1 the mirror); with tta the views' logits are averaged."""
    with torch.no_grad():
        return (head(x).mean(1) if tta else head(x[:, 0])).numpy()


def one(feats, samples, classes, held: set[str], seed: int, dim: int, final_too: bool) -> dict:
    """The heads are trained once; each is read without and with the test-time mirror."""
    lo = common.LeftOut(feats, samples, classes, held)
    keep, orig, ys = lo.known, lo.orig, lo.y
    f = {sp: v[..., :dim] for sp, v in feats.items()}
    tm, tom, vm, sm = keep["train"], keep["train"] & orig["train"], keep["val"], keep["test"]
    tx, ty = f["train"][tm], torch.as_tensor(ys("train", tm))
    vx, vy, sx, sy = f["val"][vm], ys("val", vm), f["test"][sm], ys("test", sm)
    hx = torch.cat([f[sp][~keep[sp]] for sp in ("val", "test")])  # held codes' photos of the later collection
    n = lo.classes
    head0 = common.train_head(tx, ty, n, seed=seed)
    final = common.train_head(torch.cat([tx, vx[:, 0]]), torch.cat([ty, torch.as_tensor(vy)]), n, seed=seed) \
        if final_too else None
    return {tta: read(head0, final, f, samples, lo, vm, vx, vy, sx, sy, hx, tta) for tta in (False, True)}


def read(head0, final, f, samples, lo, vm, vx, vy, sx, sy, hx, tta: bool) -> dict:
    tom = lo.known["train"] & lo.orig["train"]
    v_lg = logits_of(head0, vx, tta)
    t = common.temperature(v_lg, vy)
    gx, gy = f["train"][tom].numpy(), lo.y("train", tom)
    # make train's fit: Gaussians of the training photos, the threshold at 10 % of 2018 (the fused score)
    scorer = unknown.fit(gx, gy, vx[:, 0].numpy(), v_lg, t, "rmd_msp", 0.1)
    v_score, u = scorer.reference["score"], scorer.threshold
    vp = unknown.softmax(v_lg, t)
    r = calibration.fit_review_threshold(vp, vy, common.calibration_settings(), None, v_score <= u)
    rulings = [s.rrdc_no for s, k in zip(samples["val"], vm) if k]
    out = {"top1_2018": float((vp.argmax(1) == vy).mean()), "right_2018": (vp.argmax(1) == vy).tolist(),
           "rulings_2018": rulings, "review_threshold": float(r),
           "coverage_2018": float(calibration.unflagged(vp.max(1), r, v_score > u).mean())}
    if len(hx):  # the pre-refit model meets the held-out codes' photos (the choice protocol: 2018 is its reference)
        h_lg = logits_of(head0, hx, tta)
        h_score = scorer.score(hx[:, 0].numpy(), h_lg)
        out["held_unflagged"] = float(calibration.unflagged(unknown.softmax(h_lg, t).max(1), r, h_score > u).mean())
        out["held_auroc"] = unknown.auroc(v_score, h_score)
    if final is not None:  # 2019: read, not chosen on
        sp_ = unknown.softmax(logits_of(final, sx, tta), t)
        right = sp_.argmax(1) == sy
        ok = calibration.unflagged(sp_.max(1), r, None)
        out |= {"top1_2019": float(right.mean()), "top3_2019": float(
            (np.argsort(-sp_, 1)[:, :3] == sy[:, None]).any(1).mean()), "coverage_2019": float(ok.mean()),
            "precision_2019": float(right[ok].mean()) if ok.any() else None}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    args = ap.parse_args()
    feats, samples, classes, cfg, _ = common.features(["model.concat=[efficientnet_lite0,efficientnet_lite2]", "tta=true"])
    choice = set(common.choice_codes(Path(cfg.paths.raw_store)))
    rows = {}
    for name, dim in (("lite1+lite0", BASE_DIM), ("lite1+lite0+lite2", feats["train"].shape[-1])):
        full = {s: one(feats, samples, classes, set(), s, dim, True) for s in args.seeds}
        held = {s: one(feats, samples, classes, choice, s, dim, False) for s in args.seeds}
        for tta in (False, True):
            key = name + (" +mirror" if tta else "")
            rows[key] = {"full": {s: full[s][tta] for s in args.seeds}, "choice": {s: held[s][tta] for s in args.seeds}}
            print(key, {k: round(float(np.mean([rows[key]["full"][s][k] for s in args.seeds])), 3)
                        for k in ("top1_2018", "top1_2019", "coverage_2019")},
                  "held", round(float(np.mean([rows[key]["choice"][s]["held_unflagged"] for s in args.seeds])), 3),
                  flush=True)
    table = summary(rows, args.seeds)
    (ROOT / "studies" / "accuracy_candidates.json").write_text(json.dumps({"seeds": args.seeds, "table": table,
                                                                          "rows": rows}, indent=1))
    for line in table:
        print(line)


def summary(rows: dict, seeds: list[int]) -> list[str]:
    """Markdown rows: means over seeds; the paired difference vs the baseline over 2018's rulings (per photo the
    share of seeds right, as studies/features_search.py pairs)."""
    base = rows["lite1+lite0"]["full"]
    lines = ["| candidate | 2018 top-1 | paired diff vs baseline, 2018 | held-out choice codes unflagged | "
             "2019 top-1 | 2019 top-3 | 2019 coverage |", "|---|---|---|---|---|---|---|"]
    for key, r in rows.items():
        full, choice = r["full"], r["choice"]
        mean = lambda d, k: float(np.mean([d[s][k] for s in seeds]))  # noqa: E731
        a = np.mean([full[s]["right_2018"] for s in seeds], 0)  # per photo: the share of seeds right
        b = np.mean([base[s]["right_2018"] for s in seeds], 0)
        diff = evaluation.paired_difference(a, b, full[seeds[0]]["rulings_2018"]) if key != "lite1+lite0" else None
        d = "-" if diff is None else f"{diff[0]:+.3f} [{diff[1]:+.3f}, {diff[2]:+.3f}]"
        lines.append(f"| {key} | {mean(full, 'top1_2018'):.3f} | {d} | {mean(choice, 'held_unflagged'):.3f} | "
                     f"{mean(full, 'top1_2019'):.3f} | {mean(full, 'top3_2019'):.3f} | "
                     f"{mean(full, 'coverage_2019'):.2f} |")
    return lines


if __name__ == "__main__":
    main()
