"""Safe by default, measured: `bash studies/safety_eval.sh [training overrides]` -> studies/safety_results.json.

Four training runs of the same configuration (default `experiment=recommended`) on dataset=demo, each a real
`python -m hsflow.train` (MLflow experiment "safety-eval"):

1. full    — every code; the figures `make train` prints: 2019 top-1, and what goes out unflagged (coverage, precision).
2. choice  — the CHOICE codes held out of every split: each unknown score's AUROC against the 2018 (validation)
             photos of trained codes, and the trade-off table on validation. The method and the unknown rate are
             chosen here, never on the reporting codes nor on 2019.
3. report  — the REPORT codes held out (docs/unknown.md's seven: each chapter's median code): each score's AUROC and
             FPR at 95 % TPR against the 2019 photos of trained codes, and the share of the held-out codes' photos
             answered with neither `unknown` nor `needs_review`.
4. shift   — the collection-shift window: trained before 2017, every threshold fitted on 2017 (the first photo
             collection), scored on 2018 (the first rulings of the second collection): does the promise travel?

`--runs FULL CHOICE REPORT SHIFT` re-reads four existing runs instead of training.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # hsflow and studies.common from this checkout
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from hsflow.core.config import default_tracking_uri  # noqa: E402
from hsflow.data.store import RawStore  # noqa: E402
from studies import common  # noqa: E402
from studies.common import REPORT, choice_codes, train  # noqa: E402


def shift_store(store: Path, folder: Path) -> Path:
    """The store as it stood at the end of 2018 (no 2019 ruling): the shift window's test period is 2018."""
    from hsflow.lifecycle.periods import store_until

    view = folder / "store_before_2019-01-01"
    return view if view.exists() else Path(store_until(RawStore(store), "2019-01-01", folder))


def runs(args, overrides: list[str]) -> dict[str, str]:
    if args.runs:
        return dict(zip(("full", "choice", "report", "shift"), args.runs))
    held = common.exclude_override
    shift = shift_store(Path(args.store), ROOT / "cache" / "shift-store")
    return {"full": train(overrides, "safety full", args.experiment),
            "choice": train([*overrides, held(choice_codes(Path(args.store)))], "safety choice", args.experiment),
            "report": train([*overrides, held(REPORT)], "safety report", args.experiment),
            "shift": train([*overrides, f"paths.raw_store={shift}", "dataset.split.cuts=[2017-01-01,2018-01-01]"],
                           "safety shift", args.experiment)}


def read(client, run_id: str, tmp: str) -> tuple[dict, dict | None]:
    metrics = client.get_run(run_id).data.metrics
    try:
        tradeoff = json.loads(Path(client.download_artifacts(run_id, "unknown/tradeoff.json", tmp)).read_text())
    except Exception:  # noqa: BLE001 - a run without held-out codes has no trade-off table
        tradeoff = None
    return metrics, tradeoff


def ci(m: dict, key: str) -> str:
    return f"{m[key]:.3f} [{m[key + '_ci_low']:.3f}, {m[key + '_ci_high']:.3f}]" if key in m else "n/a"


def tables(result: dict) -> str:
    m, lines = result["metrics"], []
    scores = sorted({k.split("auroc_")[1] for k in m["report"] if k.startswith("test/heldout_auroc_")})
    lines += ["| score | AUROC, choice codes vs 2018 (chosen here) | AUROC, report codes vs 2019 | FPR at 95 % TPR, "
              "report codes |", "|---|---|---|---|"]
    lines += [f"| {s} | {m['choice'].get(f'val/heldout_auroc_{s}', float('nan')):.3f} | "
              f"{m['report'][f'test/heldout_auroc_{s}']:.3f} | {m['report'][f'test/heldout_fpr95_{s}']:.3f} |"
              for s in scores]
    lines += ["", "| run | top-1 | unflagged: share of photos | unflagged: right | unknown | held-out codes' photos "
              "answered unflagged |", "|---|---|---|---|---|---|"]
    for name, label in (("full", "full, 2019"), ("report", "report codes held out, 2019"),
                        ("choice", "choice codes held out, 2019"), ("shift", "shift window: <2017 / 2017 / 2018")):
        r = m[name]
        lines.append(f"| {label} | {ci(r, 'test/top1')} | {r.get('test/unflagged_coverage', float('nan')):.3f} | "
                     f"{ci(r, 'test/unflagged_precision')} | {r.get('test/unknown_rate', float('nan')):.3f} | "
                     f"{r.get('test/heldout_unflagged_rate', float('nan')):.3f} |")
    for name in ("choice", "report"):
        t = result["tradeoff"].get(name)
        if not t:
            continue
        lines += ["", f"Trade-off, {name} codes held out (unknown score {t['method']}):", "",
                  "| unknown rate on validation | review method | val coverage / precision | 2019 coverage / "
                  "precision | held-out photos unflagged |", "|---|---|---|---|---|"]
        lines += [f"| {r['max_val_rate']:.2f} | {r['review_method']} | {r['val_coverage']:.2f} / "
                  f"{r['val_precision']:.3f} | {r['test_coverage']:.2f} / {r['test_precision']:.3f} | "
                  f"{r['heldout_unflagged']:.2f} |" for r in t["rows"]]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("overrides", nargs="*", default=["experiment=recommended"])
    ap.add_argument("--runs", nargs=4, metavar=("FULL", "CHOICE", "REPORT", "SHIFT"))
    ap.add_argument("--store", default=str(ROOT / "data" / "demo"))
    ap.add_argument("--experiment", default="safety-eval")
    ap.add_argument("--out", default=str(ROOT / "studies" / "safety_results.json"))
    args = ap.parse_args()
    started = time.perf_counter()
    ids = runs(args, [*args.overrides, f"paths.raw_store={args.store}"] if not args.runs else [])
    from mlflow.tracking import MlflowClient

    client = MlflowClient(default_tracking_uri())
    result = {"command": "bash studies/safety_eval.sh " + " ".join(args.overrides), "runs": ids,
              "report_codes": REPORT, "choice_codes": choice_codes(Path(args.store)), "metrics": {}, "tradeoff": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, run_id in ids.items():
            result["metrics"][name], result["tradeoff"][name] = read(client, run_id, tmp)
    result["minutes"] = round((time.perf_counter() - started) / 60, 1)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(tables(result))
    print(f"\nwritten {args.out} in {result['minutes']} min")


if __name__ == "__main__":
    main()
