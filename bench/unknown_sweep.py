"""Which relative-Mahalanobis space and which fusion? An offline sweep on the feature cache (issue 25):

    .venv/bin/python bench/unknown_sweep.py [experiment=recommended ...]   # after `make train` filled the cache

For each held-out set (CHOICE codes, scored against 2018; REPORT codes, against 2019 — bench/safety_eval.py's sets)
a head like make train's (hidden 512, dropout 0.5, AdamW, cosine, label smoothing 0.1, generated copies) is trained
on the training period without those codes, its temperature fitted on 2018; then every variant of the unknown
score's Gaussians (feature normalisation, PCA dimensions, shrinkage) and every fusion is scored by AUROC. The variant
is chosen on the CHOICE columns only; the REPORT columns are read, not chosen on. Output: bench/unknown_sweep.json.
"""
from __future__ import annotations

import json
import zlib
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from hsflow.models.classifier import head_from_spec  # noqa: E402
from hsflow.training import stages  # noqa: E402

from hsflow.models import unknown
from safety_eval import REPORT, choice_codes  # noqa: E402


def features(overrides: list[str]) -> tuple[dict, dict, list[str], object, object]:
    with initialize_config_dir(str(ROOT / "conf"), version_base=None):
        cfg = compose("train", overrides=["experiment=recommended", *overrides])
    ctx = stages.RunContext(cfg)
    for stage in (stages.setup, stages.dataset, stages.network):
        stage(ctx)
    feats = stages.cached_features(ctx)
    samples = {sp: ctx.spec.split(sp) for sp in ("train", "val", "test")}
    return feats, samples, ctx.spec.classes, cfg, ctx


def train_head(x: torch.Tensor, y: torch.Tensor, classes: int, epochs: int = 20, seed: int = 42) -> torch.nn.Module:
    torch.manual_seed(seed)
    # make train's own head (hsflow.models.classifier), shaped as the recommended experiment sets it: it follows
    # a change there (same layers, in the same order, as the copy it replaced: the same draws from the seed).
    head = head_from_spec(x.shape[1], classes, OmegaConf.load(ROOT / "conf/experiment/recommended.yaml").model.head)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3)
    steps = epochs * ((len(x) + 31) // 32)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(32):
            opt.zero_grad()
            loss_fn(head(x[idx]), y[idx]).backward()
            opt.step()
            sched.step()
    return head.eval()


def temperature(logits: torch.Tensor, y: torch.Tensor) -> float:
    t = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([t], max_iter=100)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / t.exp(), y)
        loss.backward()
        return loss
    opt.step(closure)
    return float(t.exp())


def rmd_scores(train, labels, queries: list[np.ndarray], norm: str, dim: int, shrink: float) -> list[np.ndarray]:
    normalize = {"l2": "l2", "raw": "none"}[norm]
    scorer = unknown.UnknownScorer("rmd", 0.0, unknown.gaussians(train, labels, dim, shrink, normalize),
                                   normalize=normalize)
    return [scorer.rmd(q) for q in queries]


def one_setting(feats, samples, classes, held: set[str], known: str, refit: bool) -> dict:
    """AUROC of every variant for one held-out set. known="test": 2019 photos of trained codes; with `refit` the head
    and the Gaussians also learn 2018 (as make train's refit does), the validation reference scores stay those of the
    train-only fit. known="val": 2018; with `refit`, 2018's rulings split in halves: the first joins the fit, the
    second is scored (what the refit does, one period earlier)."""
    keep = lambda sp: np.array([classes[s.label] not in held for s in samples[sp]])  # noqa: E731
    orig = lambda sp: np.array([s.view == 0 for s in samples[sp]])  # noqa: E731
    hx = torch.cat([feats[sp][orig(sp) & ~keep(sp)] for sp in ("train", "val", "test")])
    remap = {c: i for i, c in enumerate(c for c in classes if c not in held)}
    y_of = lambda sp, m: torch.tensor([remap[classes[s.label]] for s, k in zip(samples[sp], m) if k])  # noqa
    vmask = keep("val") & orig("val")
    if known == "val" and refit:  # halves of 2018 by ruling
        first = np.array([zlib.crc32(s.rrdc_no.encode()) % 2 == 0 for s in samples["val"]])
        ref_mask, add_mask, kmask, ksp = vmask & first, vmask & first, vmask & ~first, "val"
    elif known == "val":
        ref_mask, add_mask, kmask, ksp = vmask, None, vmask, "val"
    else:
        ref_mask, add_mask, kmask, ksp = vmask, (vmask if refit else None), keep("test") & orig("test"), "test"
    tm, tom = keep("train"), keep("train") & orig("train")
    base_x, base_y = feats["train"][tm], y_of("train", tm)
    gx, gy = feats["train"][tom], y_of("train", tom)
    head0 = train_head(base_x, base_y, len(remap))
    rx, ry = feats["val"][ref_mask], y_of("val", ref_mask)
    with torch.no_grad():
        t = temperature(head0(rx), ry)
    head = head0
    fx, fy = gx, gy
    if add_mask is not None:
        ax, ay = feats["val"][add_mask], y_of("val", add_mask)
        head = train_head(torch.cat([base_x, ax]), torch.cat([base_y, ay]), len(remap))
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
    for norm in ("l2", "raw"):
        for dim in (256, 512, 1024):
            for shrink in (0.0, 0.01, 0.1):
                ref = rmd_scores(gx.numpy(), gy.numpy(), [rx.numpy()], norm, dim, shrink)[0]
                k, h = rmd_scores(fx.numpy(), fy.numpy(), [kx.numpy(), hx.numpy()], norm, dim, shrink)
                name = f"rmd_{norm}_pca{dim}_s{shrink}"
                out[name] = unknown.auroc(k, h)
                fused = {n: (q(ref, a) + q(msp["ref"], msp[n])) / 2 for n, a in (("known", k), ("held", h))}
                out[name + "+msp"] = unknown.auroc(fused["known"], fused["held"])
                fused3 = {n: (q(ref, a) + q(msp["ref"], msp[n]) + q(energy["ref"], energy[n])) / 3
                          for n, a in (("known", k), ("held", h))}
                out[name + "+msp+energy"] = unknown.auroc(fused3["known"], fused3["held"])
                print(name, round(out[name], 3), round(out[name + "+msp"], 3), round(out[name + "+msp+energy"], 3),
                      flush=True)
    return out


def main() -> None:
    overrides = [a for a in sys.argv[1:] if not a.startswith('--')]
    feats, samples, classes, cfg, _ = features(overrides)
    refit = "--no-refit" not in sys.argv
    choice = set(choice_codes(Path(cfg.paths.raw_store)))
    result = {"overrides": overrides, "refit": refit,
              "choice": one_setting(feats, samples, classes, choice, "val", refit),
              "report": one_setting(feats, samples, classes, set(REPORT), "test", refit)}
    names = [k for k in result["choice"] if k.startswith("rmd") or k in ("msp", "energy")]
    best = max(names, key=lambda k: result["choice"][k])
    result["chosen_on_choice"] = best
    print("| score | choice codes vs 2018 | report codes vs 2019 |")
    for k in sorted(names, key=lambda k: -result["choice"][k])[:20]:
        print(f"| {k} | {result['choice'][k]:.3f} | {result['report'][k]:.3f} |")
    (ROOT / "bench" / f"unknown_sweep{'' if refit else '_norefit'}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
