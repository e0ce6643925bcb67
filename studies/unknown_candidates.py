"""Which unknown score? The candidates side by side on two trained runs (as studies/unknown_eval.sh trains them):

    python studies/unknown_candidates.py FULL_RUN_ID HELDOUT_RUN_ID [--tracking-uri URI]

Candidates: cosine distance to the k-th nearest training photo in the backbone's pooled features (what
hsflow.models.unknown ships) or in the head's hidden layer, energy (-logsumexp of the logits, raw and at the model's
temperature), max-logit, maximum softmax probability, and z-scored sums/maxima of pairs. Each threshold calls 5 % of
the run's validation photos unknown; the rates are then read on the test rulings (full run), on every photo of the
held-out codes and on data/ood (held-out run). Features come from the feature cache (the run's own backbone).
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from torch.nn.functional import normalize  # noqa: E402

from hsflow.serving import recommend as R  # noqa: E402
from hsflow.models import unknown  # noqa: E402
from hsflow.core.config import default_tracking_uri  # noqa: E402
from hsflow.data.builder import build_dataset  # noqa: E402
from hsflow.data.transforms import build_preprocess, spec_id  # noqa: E402
from hsflow.data.features import FeatureCache, extract  # noqa: E402
from hsflow.core.images import open_rgb  # noqa: E402
from hsflow.models.backbones import build_backbone, split_backbone  # noqa: E402


def run_outputs(run_id: str, client) -> dict:
    """Backbone embeddings, hidden-layer outputs and logits of train/val/test, held-out photos and data/ood."""
    model = R.load(f"runs:/{run_id}/model")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = OmegaConf.create(Path(client.download_artifacts(run_id, "config.yaml", tmp)).read_text())
    spec = build_dataset(cfg.dataset, cfg.paths.raw_store, cache_dir=cfg.paths.cache_dir, verbose=False)
    pre = model.meta["preprocess"]
    net = split_backbone(build_backbone(model.meta["backbone"], True), model.meta["unfreeze"], spec_id(pre))
    cache = FeatureCache(cfg.paths.cache_dir, net.cache_id)
    sets = {sp: spec.split(sp, originals_only=True) for sp in ("train", "val", "test")}
    sets["heldout"], held_photos = unknown.heldout_photos(cfg)
    head = model.net[2].eval()
    out = {}
    with torch.inference_mode():
        for name, samples in sets.items():
            if samples:
                feats = extract(samples, net.prefix, build_preprocess(pre), cache, num_workers=0,
                                draft_size=pre["resize"], desc=name)
                emb = model.net[1](feats)
                out[name] = (emb, head[:-1](emb), head(emb))
        files = sorted((ROOT / "data" / "ood").glob("*.jpg"))
        x = torch.stack([model.preprocess()(open_rgb(f, draft_size=pre["resize"])) for f in files])
        emb = model.embedding(x)
        out["ood"] = (emb, head[:-1](emb), head(emb))
    labels = torch.tensor([s.label for s in sets["train"]])
    return {"outputs": out, "temperature": model.temperature, "train_labels": labels, "classes": spec.classes,
            "heldout_codes": [p.hs_code for p in held_photos]}


def gaussian_scores(train: torch.Tensor, labels: torch.Tensor, x: torch.Tensor, shrink: float = 0.1) -> dict:
    """Backbone-feature scores that discount directions in which photos of one class vary (light, shelf, angle):
    Mahalanobis distance to the nearest class mean under the shared within-class covariance (Lee et al. 2018), its
    relative form minus the distance under one Gaussian of all training photos (Ren et al. 2021, meant for near
    out-of-distribution inputs), and the nearest training photo after whitening by that covariance."""
    train, x = train.double(), x.double()
    means = torch.stack([train[labels == c].mean(0) for c in labels.unique()])
    centre = train.mean(0)

    def precision(dev: torch.Tensor) -> torch.Tensor:  # shrunk toward the mean variance: 1,280 dims, ~2,000 photos
        cov = dev.T @ dev / len(dev)
        return torch.linalg.inv((1 - shrink) * cov + shrink * cov.diagonal().mean() * torch.eye(len(cov), dtype=cov.dtype))

    p_within = precision(train - means[torch.searchsorted(labels.unique(), labels)])
    p_all = precision(train - centre)
    diff = x[:, None] - means[None]
    md = torch.einsum("ncd,de,nce->nc", diff, p_within, diff)
    md_all = torch.einsum("nd,de,ne->n", x - centre, p_all, x - centre)
    white = torch.linalg.cholesky(p_within)
    sims = normalize((x - centre) @ white, dim=1) @ normalize((train - centre) @ white, dim=1).T
    return {"mahalanobis": md.min(1).values.float(), "relative mahalanobis": (md - md_all[:, None]).min(1).values.float(),
            "knn1 whitened backbone": (1 - sims.max(1).values).float()}


def scores(run: dict) -> dict[str, dict[str, torch.Tensor]]:
    out, t = run["outputs"], run["temperature"]
    banks = {"backbone": normalize(out["train"][0], dim=1), "hidden": normalize(out["train"][1], dim=1)}
    res = {}
    for name, (emb, hid, logits) in out.items():
        if name == "train":
            continue
        d = {}
        for layer, z in (("backbone", emb), ("hidden", hid)):
            sims = normalize(z, dim=1) @ banks[layer].T
            top = sims.topk(min(50, sims.shape[1]), dim=1).values
            for k in (1, 5, 10, 50):
                d[f"knn{k} {layer}"] = 1 - top[:, min(k, top.shape[1]) - 1]
        d["energy"] = -torch.logsumexp(logits, 1)
        d["energy at T"] = -t * torch.logsumexp(logits / t, 1)
        d["max-logit"] = -logits.max(1).values
        d["max softmax prob."] = 1 - torch.softmax(logits / t, 1).max(1).values
        d |= gaussian_scores(out["train"][0], run["train_labels"], emb)
        res[name] = d
    for a, b in (("knn1 backbone", "max softmax prob."), ("knn1 backbone", "energy"),
                 ("knn1 backbone", "knn10 hidden"), ("knn10 hidden", "max softmax prob.")):
        za = {sp: (d[a] - res["val"][a].mean()) / res["val"][a].std() for sp, d in res.items()}
        zb = {sp: (d[b] - res["val"][b].mean()) / res["val"][b].std() for sp, d in res.items()}
        for sp, d in res.items():
            d[f"z-sum({a}, {b})"] = za[sp] + zb[sp]
            d[f"z-max({a}, {b})"] = torch.maximum(za[sp], zb[sp])
    return res


def auroc(neg: torch.Tensor, pos: torch.Tensor) -> float:
    return float((pos[:, None] > neg[None]).float().mean() + 0.5 * (pos[:, None] == neg[None]).float().mean())


def nearest(run: dict) -> None:
    """Where the held-out codes' photos land: the codes of their nearest training photos (backbone features), and the
    median distance to the nearest training photo of validation photos vs held-out photos."""
    import collections
    out, labels, classes = run["outputs"], run["train_labels"], run["classes"]
    bank = normalize(out["train"][0], dim=1)
    for name in ("val", "heldout"):
        sims = normalize(out[name][0], dim=1) @ bank.T
        print(f"{name}: median cosine distance to the nearest training photo {float((1 - sims.max(1).values).median()):.3f}")
    near = collections.defaultdict(collections.Counter)
    idx = (normalize(out["heldout"][0], dim=1) @ bank.T).argmax(1)
    for code, i in zip(run["heldout_codes"], idx.tolist()):
        near[code][classes[int(labels[i])]] += 1
    for code, counts in sorted(near.items()):
        print(f"held-out {code} ({sum(counts.values())} photos): nearest training photos' codes {counts.most_common(3)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("full")
    ap.add_argument("heldout")
    ap.add_argument("--tracking-uri", default=default_tracking_uri())
    args = ap.parse_args()
    from mlflow.tracking import MlflowClient

    os.environ["MLFLOW_TRACKING_URI"] = args.tracking_uri
    client = MlflowClient(args.tracking_uri)
    held_run = run_outputs(args.heldout, client)
    full, held = scores(run_outputs(args.full, client)), scores(held_run)
    nearest(held_run)
    buf = io.StringIO()
    buf.write("| score | val | test (2019) | held-out codes | out-of-scope | AUROC val vs held-out |\n"
              "|---|---|---|---|---|---|\n")
    for key in full["val"]:
        t_full = unknown.fit_threshold(full["val"][key])
        t_held = unknown.fit_threshold(held["val"][key])
        r = [float((full["val"][key] > t_full).float().mean()), float((full["test"][key] > t_full).float().mean()),
             float((held["heldout"][key] > t_held).float().mean()), float((full["ood"][key] > t_full).float().mean())]
        buf.write(f"| {key} | " + " | ".join(f"{v:.3f}" for v in r)
                  + f" | {auroc(held['val'][key], held['heldout'][key]):.3f} |\n")
    print(buf.getvalue())


if __name__ == "__main__":
    main()
