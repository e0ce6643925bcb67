"""Can anything cheap move the safety frontier? An offline experiment on the feature cache (issue 25, fourth round).

    .venv/bin/python studies/safety_frontier.py [--seeds 42 43 44] [--sets choice report full] [--variants ...]

Issue 25 asks two things of make train's default that pull against each other: >= 65 % of 2019 answered unflagged,
and <= 35 % of held-out codes' photos answered unflagged. Both follow the review threshold; this script asks whether a
change of head or of rule gives more of one for the same amount of the other (moves the frontier) or only slides along
it. Each variant trains a head like make train's (hidden 512, dropout 0.5, AdamW 1e-3, per-step cosine, 20 epochs,
the generated copies) on the training period without the held-out codes, and the final head on training + 2018;
thresholds are fitted on 2018 as the model before 2018 answers it (review bound: Clopper-Pearson >= 0.95 at 80 %),
then applied to the final head on 2019 and on every photo of the held-out codes. Heads (`HEADS`):

- `single`: make train's head. Its answers are read under several rules (`RULES`):
  - `shipped`: unknown at 10 % of 2018 (fused score), review threshold fitted on the photos not called unknown;
  - `all@r`: review threshold fitted on all of 2018, then the fused-score gate at r of 2018 (a stricter gate that
    does not loosen the review threshold);
  - `fused_rank`: one ranking by the fused score instead of the top probability, its prefix bounded the same way.
- `ensemble3`: 3 heads trained side by side (batched matmuls), their logits averaged (deep ensemble);
- `no_smoothing`: label smoothing 0 instead of 0.1 (smoothing is reported to hurt selective classification);
- `mixture_outliers`: outlier exposure with virtual outliers: each batch also carries mixtures of two photos'
  features of different codes (weights 0.3-0.7), trained towards the uniform answer (weight 0.5).

The CHOICE codes choose (studies/common.py); REPORT codes and 2019 are read only; `full` (no codes held out)
shows what coverage make train's setting would give. Output: studies/safety_frontier.json, its table of means and
studies/safety_frontier.png (beside make train's own runs from studies/safety_results*.json); read in docs/unknown.md.
`--plot` redraws the table and the figure from the JSON without training anything.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # hsflow and studies.common from this checkout

import numpy as np  # noqa: E402
import torch  # noqa: E402

from hsflow.models import calibration, unknown  # noqa: E402
from studies import common  # noqa: E402

HEADS = {"single": {}, "ensemble3": {"members": 3}, "no_smoothing": {"smoothing": 0.0},
         "mixture_outliers": {"outliers": 0.5}}
GATES = (0.2, 0.3, 0.4)


class Heads(torch.nn.Module):
    """`members` heads like make train's, trained side by side: batched matmuls over a leading member axis."""

    def __init__(self, dim: int, classes: int, members: int, seed: int, hidden: int = 512):
        super().__init__()
        g = torch.Generator().manual_seed(seed)

        def linear(i, o):  # torch.nn.Linear's default initialisation, one per member
            b = 1 / i ** 0.5
            return (torch.nn.Parameter((torch.rand(members, i, o, generator=g) * 2 - 1) * b),
                    torch.nn.Parameter((torch.rand(members, 1, o, generator=g) * 2 - 1) * b))

        self.w1, self.b1 = linear(dim, hidden)
        self.w2, self.b2 = linear(hidden, classes)
        self.members = members

    def each(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.dropout(x.expand(self.members, *x.shape), 0.5, self.training)
        h = torch.nn.functional.dropout(torch.relu(torch.baddbmm(self.b1, x, self.w1)), 0.5, self.training)
        return torch.baddbmm(self.b2, h, self.w2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.each(x).mean(0)


def train(x, y, classes: int, seed: int, members: int = 1, smoothing: float = 0.1, outliers: float = 0.0,
          epochs: int = 20) -> Heads:
    torch.manual_seed(seed)
    m = Heads(x.shape[1], classes, members, seed)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * ((len(x) + 31) // 32))
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=smoothing)
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(32):
            opt.zero_grad()
            xb, yb = x[idx], y[idx]
            loss = loss_fn(m.each(xb).reshape(-1, classes), yb.repeat(members))
            if outliers:
                loss = loss + outliers * mixture_loss(m, xb, yb)
            loss.backward()
            opt.step()
            sched.step()
    return m.eval()


def mixture_loss(m: Heads, xb, yb) -> torch.Tensor:
    """Cross-entropy towards the uniform answer on mixtures of two photos of different codes."""
    perm = torch.randperm(len(yb))
    diff = yb != yb[perm]
    if not diff.any():
        return torch.zeros(())
    lam = torch.empty(int(diff.sum()), 1).uniform_(0.3, 0.7)
    mixed = lam * xb[diff] + (1 - lam) * xb[perm][diff]
    return -torch.log_softmax(m.each(mixed), -1).mean(-1).mean()


def arrays(feats, samples, classes, held: set[str]) -> dict:
    """Training (with copies), Gaussian training (originals), 2018, 2019 and held-out photos, labels remapped."""
    lo = common.LeftOut(feats, samples, classes, held)
    keep, orig = lo.known, lo.orig

    def xy(sp, mask):
        return feats[sp][mask], lo.y(sp, mask)

    out = {"train": xy("train", keep["train"]), "gauss": xy("train", keep["train"] & orig["train"]),
           "val": xy("val", keep["val"] & orig["val"]), "test": xy("test", keep["test"] & orig["test"]),
           "classes": lo.classes}
    out["held"] = lo.heldout(list(samples)).numpy() if held else None
    return out


def answers(a: dict, seed: int, head: dict) -> dict:
    """The head before 2018 on 2018, the final head on 2019 and the held-out photos: probabilities and fused scores
    (rmd from Gaussians of the training photos, then of training + 2018, as make train fits them)."""
    (tx, ty), (gx, gy), (vx, vy), (sx, sy) = a["train"], a["gauss"], a["val"], a["test"]
    vx, sx, gx = vx.numpy(), sx.numpy(), gx.numpy()
    t0 = time.time()
    before = train(tx, torch.as_tensor(ty), a["classes"], seed, **head)
    fit_s = time.time() - t0
    final = train(torch.cat([tx, torch.as_tensor(vx)]), torch.as_tensor(np.concatenate([ty, vy])), a["classes"],
                  seed, **head)
    hx = a["held"] if a["held"] is not None else np.zeros((0, vx.shape[1]), np.float32)
    with torch.no_grad():
        lg = {"val": before(torch.as_tensor(vx)).numpy(), "test": final(torch.as_tensor(sx)).numpy(),
              "held": final(torch.as_tensor(hx)).numpy()}
    t = common.temperature(lg["val"], vy)
    # make train's own fit: validation scored by Gaussians of the training photos, the shipped ones learn 2018 too
    scorer = unknown.fit(gx, gy, vx, lg["val"], t, "rmd_msp", 0.10, val_labels=vy)
    fused = {"val": scorer.reference["score"], "test": scorer.score(sx, lg["test"]),
             "held": scorer.score(hx, lg["held"])}
    probs = {sp: unknown.softmax(v, t) for sp, v in lg.items()}
    return {"probs": probs, "fused": fused, "labels": {"val": vy, "test": sy}, "fit_s": fit_s}


def rules(ans: dict, names: list[str]) -> dict:
    """Each rule's 2019 coverage and precision, held-out photos unflagged, 2019 photos called unknown."""
    p, f, y = ans["probs"], ans["fused"], ans["labels"]
    right = {sp: p[sp].argmax(1) == y[sp] for sp in y}

    def figures(ok, u=None):  # u: the rule's unknown threshold (how many 2019 photos of trained codes it calls so)
        return {"coverage": float(ok["test"].mean()),
                "precision": float(right["test"][ok["test"]].mean()) if ok["test"].any() else None,
                "heldout_unflagged": float(ok["held"].mean()) if len(ok["held"]) else None,
                "unknown_2019": None if u is None else float((f["test"] > u).mean())}

    out = {}
    u = unknown.fit_threshold(f["val"], 0.10)
    cal = common.calibration_settings()
    r = calibration.fit_review_threshold(p["val"], y["val"], cal, None, f["val"] <= u)
    out["shipped"] = figures({sp: calibration.unflagged(p[sp].max(1), r, f[sp] > u) for sp in ("test", "held")}, u)
    if "all" in names:
        r_all = calibration.fit_review_threshold(p["val"], y["val"], cal)
        for rate in GATES:
            u = unknown.fit_threshold(f["val"], rate)
            out[f"all@{rate}"] = figures({sp: calibration.unflagged(p[sp].max(1), r_all, f[sp] > u)
                                          for sp in ("test", "held")}, u)
    if "fused_rank" in names:
        order = np.argsort(f["val"], kind="stable")  # least unknown first: most confident
        thr = calibration.bound_on_ranking(-f["val"][order], right["val"][order].astype(float),
                                           cal["target_precision"], cal["delta"], sequential=False)
        out["fused_rank"] = figures({sp: -f[sp] >= thr for sp in ("test", "held")})
    return out


def lightning_points() -> dict:
    """(2019 coverage, held-out unflagged) of make train's own runs (studies/safety_eval.sh, seeds 42-44): every row
    of their trade-off tables (unknown rate x review method), and the shipped setting's."""
    out = {}
    for path in sorted((ROOT / "studies").glob("safety_results*.json")):
        tradeoff = json.loads(path.read_text())["tradeoff"]
        for name in ("choice", "report"):
            for r in tradeoff[name]["rows"]:
                shipped = r["review_method"] == "clopper_pearson" and abs(r["max_val_rate"] - 0.10) < 1e-9
                key = (name, "shipped" if shipped else "other")
                out.setdefault(key, []).append((r["test_coverage"], r["heldout_unflagged"]))
    return out


def table(rows: list[dict]) -> str:
    """Means over seeds per set, head and rule: 2019 coverage / precision, held-out photos unflagged, AUROCs."""
    groups: dict = {}
    for row in rows:
        for rule, f in row["rules"].items():
            groups.setdefault((row["variant"], rule), {}).setdefault(row["set"], []).append(row | f)
    mean = lambda rs, k: np.mean([r[k] for r in rs if r.get(k) is not None]) if rs else math.nan  # noqa: E731
    lines = ["| head | rule | choice: 2019 coverage / right | choice: held-out unflagged | report: 2019 coverage / "
             "right | report: held-out unflagged | AUROC msp / fused (choice; report) | full: 2019 coverage / unknown |",
             "|---|---|---|---|---|---|---|---|"]
    for (variant, rule), sets in groups.items():
        c, r, f = sets.get("choice", []), sets.get("report", []), sets.get("full", [])
        lines.append(f"| {variant} | {rule} | {mean(c, 'coverage'):.2f} / {mean(c, 'precision'):.3f} | "
                     f"{mean(c, 'heldout_unflagged'):.2f} | {mean(r, 'coverage'):.2f} / {mean(r, 'precision'):.3f} | "
                     f"{mean(r, 'heldout_unflagged'):.2f} | {mean(c, 'auroc_msp'):.3f} / {mean(c, 'auroc_fused'):.3f}; "
                     f"{mean(r, 'auroc_msp'):.3f} / {mean(r, 'auroc_fused'):.3f} | {mean(f, 'coverage'):.2f} / "
                     f"{mean(f, 'unknown_2019'):.2f} |")
    return "\n".join(lines)


def plot(rows: list[dict], out: Path) -> None:
    """Held-out photos unflagged against 2019 coverage: make train's runs in grey, each offline head and rule in
    colour (one point per seed and held-out set), the issue's target (>= 65 %, <= 35 %) shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 6))
    ax.add_patch(plt.Rectangle((0.65, 0), 0.35, 0.35, color="tab:green", alpha=0.12, label="issue 25's target"))
    marker = {"choice": "o", "report": "^"}
    for (name, what), pts in lightning_points().items():
        x, y = zip(*pts)
        ax.scatter(x, y, marker=marker[name], s=60 if what == "shipped" else 18, alpha=0.8 if what == "shipped" else 0.3,
                   color="black" if what == "shipped" else "grey", label=f"make train, {name} held out: "
                   f"{'shipped rule' if what == 'shipped' else 'other review methods x unknown rates'}")
    colours = iter(plt.cm.tab10.colors)
    series: dict = {}
    for row in rows:
        for rule, f in row["rules"].items():
            if row["set"] != "full" and f["heldout_unflagged"] is not None:
                series.setdefault(f"{row['variant']} / {rule}", []).append((row["set"], f["coverage"],
                                                                             f["heldout_unflagged"]))
    for label, pts in series.items():
        colour = next(colours)
        for name in ("choice", "report"):
            xy = [(c, h) for s, c, h in pts if s == name]
            if xy:
                ax.scatter(*zip(*xy), marker=marker[name], color=colour, s=28,
                           label=f"offline {label}" if name == "choice" else None)
    ax.set(xlabel="2019 photos of trained codes answered unflagged (coverage)",
           ylabel="held-out codes' photos answered unflagged", xlim=(0.45, 0.95), ylim=(0.1, 0.75),
           title="Safety against coverage: o choice codes held out, ^ report codes (seeds 42-44)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6.5, loc="upper left")
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    ap.add_argument("--sets", nargs="+", default=["choice", "report", "full"])
    ap.add_argument("--variants", nargs="+", default=list(HEADS))
    ap.add_argument("--out", default=str(ROOT / "studies" / "safety_frontier.json"))
    ap.add_argument("--plot", action="store_true", help="only redraw the table and figure from --out")
    args = ap.parse_args()
    if args.plot:
        rows = json.loads(Path(args.out).read_text())
        print(table(rows))
        plot(rows, Path(args.out).with_suffix(".png"))
        return
    torch.set_num_threads(2)
    feats, samples, classes, cfg, _ = common.features([])
    held_sets = {"full": set(), "choice": set(common.choice_codes(Path(cfg.paths.raw_store))),
                 "report": set(common.REPORT)}
    out = Path(args.out)
    rows = json.loads(out.read_text()) if out.exists() else []  # a rerun of some rows replaces just those
    for name in args.sets:
        a = arrays(feats, samples, classes, held_sets[name])
        for variant in args.variants:
            if name == "full" and variant != "single":
                continue  # the full set only shows the coverage make train's head would give
            for seed in args.seeds:
                ans = answers(a, seed, HEADS[variant])
                y = ans["labels"]
                row = {"set": name, "variant": variant, "seed": seed, "fit_s": round(ans["fit_s"], 1),
                       "top1_2018": float((ans["probs"]["val"].argmax(1) == y["val"]).mean()),
                       "top1_2019": float((ans["probs"]["test"].argmax(1) == y["test"]).mean())}
                if name != "full":
                    known = -ans["probs"]["test"].max(1), ans["fused"]["test"]
                    row |= {"auroc_msp": unknown.auroc(known[0], -ans["probs"]["held"].max(1)),
                            "auroc_fused": unknown.auroc(known[1], ans["fused"]["held"])}
                row["rules"] = rules(ans, ["all", "fused_rank"] if variant == "single" else [])
                rows = [r for r in rows if (r["set"], r["variant"], r["seed"]) != (name, variant, seed)] + [row]
                print(json.dumps(row), flush=True)
                out.write_text(json.dumps(rows, indent=1))
    print(table(rows))
    plot(rows, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
