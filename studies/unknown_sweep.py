"""Which relative-Mahalanobis space and which fusion? An offline sweep on the feature cache (issue 25):

    .venv/bin/python studies/unknown_sweep.py [experiment=recommended ...]   # after `make train` filled the cache

For each held-out set (CHOICE codes, scored against 2018; REPORT codes, against 2019 — studies/common.py's sets)
a head like make train's (hidden 512, dropout 0.5, AdamW, cosine, label smoothing 0.1, generated copies) is trained
on the training period without those codes, its temperature fitted on 2018; then every variant of the unknown
score's Gaussians (feature normalisation, PCA dimensions, shrinkage) and every fusion is scored by AUROC. The variant
is chosen on the CHOICE columns only; the REPORT columns are read, not chosen on. Output: studies/unknown_sweep.json.
"""
from __future__ import annotations

import json
import os
import sys
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # hsflow and studies.common from this checkout
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from hsflow.models import unknown  # noqa: E402
from studies import common  # noqa: E402


NORMALIZE = {"l2": "l2", "raw": "none"}  # the sweep's names for unknown.gaussians' normalize


def one_setting(feats, samples, classes, held: set[str], known: str, refit: bool) -> dict:
    """AUROC of every variant for one held-out set. known="test": 2019 photos of trained codes; with `refit` the head
    and the Gaussians also learn 2018 (as make train's refit does), the validation reference scores stay those of the
    train-only fit. known="val": 2018; with `refit`, 2018's rulings split in halves: the first joins the fit, the
    second is scored (what the refit does, one period earlier)."""
    lo = common.LeftOut(feats, samples, classes, held)
    keep, orig = lo.known, lo.orig
    hx = lo.heldout()
    y_of = lambda sp, m: torch.as_tensor(lo.y(sp, m))  # noqa: E731
    vmask = keep["val"] & orig["val"]
    if known == "val" and refit:  # halves of 2018 by ruling
        first = np.array([zlib.crc32(s.rrdc_no.encode()) % 2 == 0 for s in samples["val"]])
        ref_mask, add_mask, kmask, ksp = vmask & first, vmask & first, vmask & ~first, "val"
    elif known == "val":
        ref_mask, add_mask, kmask, ksp = vmask, None, vmask, "val"
    else:
        ref_mask, add_mask, kmask, ksp = vmask, (vmask if refit else None), keep["test"] & orig["test"], "test"
    tm, tom = keep["train"], keep["train"] & orig["train"]
    base_x, base_y = feats["train"][tm], y_of("train", tm)
    gx, gy = feats["train"][tom], y_of("train", tom)
    head0 = common.train_head(base_x, base_y, lo.classes)
    rx, ry = feats["val"][ref_mask], y_of("val", ref_mask)
    with torch.no_grad():
        t = common.temperature(head0(rx), ry)
    head = head0
    fx, fy = gx, gy
    if add_mask is not None:
        ax, ay = feats["val"][add_mask], y_of("val", add_mask)
        head = common.train_head(torch.cat([base_x, ax]), torch.cat([base_y, ay]), lo.classes)
        fx, fy = torch.cat([gx, ax]), torch.cat([gy, ay])
    kx = feats[ksp][kmask]
    with torch.no_grad():
        logits = {"ref": head0(rx).numpy(), "known": head(kx).numpy(), "held": head(hx).numpy()}
    sc = unknown.UnknownScorer("msp", 0.0, {}, t)
    msp = {n: sc.msp(v) for n, v in logits.items()}
    energy = {n: sc.energy(v / t) for n, v in logits.items()}
    out = {"msp": unknown.auroc(msp["known"], msp["held"]), "energy": unknown.auroc(energy["known"], energy["held"]),
           "held_photos": len(hx), "known_photos": len(kx), "temperature": t}
    q = lambda ref, a: unknown.quantile(np.sort(ref), a)  # noqa: E731
    emb = {"known": kx.numpy(), "held": hx.numpy()}
    for norm in ("l2", "raw"):
        for dim in (256, 512, 1024):
            for shrink in (0.0, 0.01, 0.1):
                # reference rmd: Gaussians of the training photos alone; the scored ones: of the fit's photos
                before = unknown.UnknownScorer("rmd", 0.0, unknown.gaussians(gx.numpy(), gy.numpy(), dim, shrink,
                                               NORMALIZE[norm]), normalize=NORMALIZE[norm])
                ref = before.rmd(rx.numpy())
                scorer = common.fused(unknown.gaussians(fx.numpy(), fy.numpy(), dim, shrink, NORMALIZE[norm]), ref,
                                      logits["ref"], t, NORMALIZE[norm])
                k, h = scorer.rmd(emb["known"]), scorer.rmd(emb["held"])
                name = f"rmd_{norm}_pca{dim}_s{shrink}"
                out[name] = unknown.auroc(k, h)
                fused = {n: scorer.score(emb[n], logits[n]) for n in ("known", "held")}
                out[name + "+msp"] = unknown.auroc(fused["known"], fused["held"])
                # three parts: no product method, so the same quantiles averaged here
                fused3 = {n: (q(ref, a) + q(msp["ref"], msp[n]) + q(energy["ref"], energy[n])) / 3
                          for n, a in (("known", k), ("held", h))}
                out[name + "+msp+energy"] = unknown.auroc(fused3["known"], fused3["held"])
                print(name, round(out[name], 3), round(out[name + "+msp"], 3), round(out[name + "+msp+energy"], 3),
                      flush=True)
    return out


def main() -> None:
    overrides = [a for a in sys.argv[1:] if not a.startswith('--')]
    feats, samples, classes, cfg, _ = common.features(overrides)
    refit = "--no-refit" not in sys.argv
    choice = set(common.choice_codes(Path(cfg.paths.raw_store)))
    result = {"overrides": overrides, "refit": refit,
              "choice": one_setting(feats, samples, classes, choice, "val", refit),
              "report": one_setting(feats, samples, classes, set(common.REPORT), "test", refit)}
    names = [k for k in result["choice"] if k.startswith("rmd") or k in ("msp", "energy")]
    best = max(names, key=lambda k: result["choice"][k])
    result["chosen_on_choice"] = best
    print("| score | choice codes vs 2018 | report codes vs 2019 |")
    for k in sorted(names, key=lambda k: -result["choice"][k])[:20]:
        print(f"| {k} | {result['choice'][k]:.3f} | {result['report'][k]:.3f} |")
    (ROOT / "studies" / f"unknown_sweep{'' if refit else '_norefit'}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
