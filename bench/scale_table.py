"""The scale and GPU tables of docs/scale.md and docs/benchmarks.md from bench/scale_3000.json, bench/scale_42.json and bench/gpu_results.json."""
import json
from pathlib import Path

B = Path(__file__).resolve().parent


def stage_rows(d):
    tr = {s["stage"]: s for s in d["train"]["stages"]}
    fit = tr["fit"]
    per_epoch = {"seconds": sum(fit["epoch_seconds"]) / len(fit["epoch_seconds"]),
                 "cpu_seconds": sum(fit["epoch_cpu_seconds"]) / len(fit["epoch_cpu_seconds"]),
                 "peak_rss_mb": fit["peak_rss_mb"]}
    missing = {"seconds": float("nan"), "cpu_seconds": float("nan"), "peak_rss_mb": float("nan")}  # older runs
    rows = [("import (`hsflow.store import-archive`)", d["stages"]["import"]),
            ("`store info` (decodes every photo)", d["stages"]["info"]),
            ("train: dataset build (decode check, quality stats, near-duplicates, split)", tr["dataset"]),
            ("train: feature extraction (64 px)", tr["features"]),
            ("train: fit, per epoch (3 epochs, validation included)", per_epoch),
            ("train: calibration (temperature, review threshold)", tr["calibrate"]),
            ("train: refit on train + validation (3 epochs)", tr.get("refit", missing)),
            ("train: test", tr["test"]),
            ("train: unknown score (bank, threshold, rates)", tr.get("unknown", missing)),
            ("train: log the model (weights, precedents, thumbnails)", tr["log_model"]), ("train: plots", tr["plots"]),
            ("train: whole process (imports, MLflow run, all of the above)", d["train"]["process"]),
            ("`hsflow.report`", d["stages"]["report"]),
            ("`hsflow.recommend` over 1,000 photos", d["stages"]["recommend"])]
    return [(name, s["seconds"], s["cpu_seconds"], s["peak_rss_mb"]) for name, s in rows]


def main():
    big, small = (json.loads((B / f"scale_{m}.json").read_text()) for m in (3000, 42))
    print("| stage | 42 codes: wall s | CPU s | peak MB | 3,000 codes: wall s | CPU s | peak MB |")
    print("|---|---|---|---|---|---|---|")
    for (name, w1, c1, m1), (_, w2, c2, m2) in zip(stage_rows(small), stage_rows(big)):
        print(f"| {name} | {w1:.1f} | {c1:.1f} | {m1:,.0f} | {w2:.1f} | {c2:.1f} | {m2:,.0f} |")
    for d in (small, big):
        print(f"| **end to end** ({d['store']['codes']:,} codes, {d['store']['photos']:,} photos) | "
              f"{d['end_to_end_seconds']:.0f} | {d['end_to_end_cpu_seconds']:.0f} | {d['peak_rss_mb']:,.0f} |")
    print()
    for label, d in (("42", small), ("3000", big)):
        for key in ("train", "train_all_codes"):
            if key in d:
                t = d[key]
                fit = next(s for s in t["stages"] if s["stage"] == "fit")
                print(f"{label} {key}: {t['last_line']} | {t['dataset_summary'][:1]} | train photos "
                      f"{fit['train_photos']} | epoch CPU us/photo {t['fit_epoch_cpu_us_per_photo']} | wall "
                      f"{t['fit_epoch_wall_us_per_photo']} | load {d['machine']['load_average_at_end']}")
    # The fit's cost per training photo after the first epoch (which pays the allocator's warm-up), and its growth
    # from 42 codes (the lower of the two 42-code runs, the stricter comparison).
    steady = {(label, key): sum(d[key]["fit_epoch_cpu_us_per_photo"][1:]) / 2
              for label, d in (("42", small), ("3000", big)) for key in ("train", "train_all_codes") if key in d}
    base = min(v for (label, _), v in steady.items() if label == "42")
    for (label, key), v in steady.items():
        print(f"fit epoch, epochs 2-3, CPU us per training photo: {label} codes {key}: {v:.0f} ({v / base:.2f}x)")
    g = json.loads((B / "gpu_results.json").read_text())
    print()
    print(f"GPU: {g['device']}, torch {g['torch']}, Lightning {g['lightning']}")
    e = g["extraction_photos_per_s"]
    print("| frozen prefix, photos/s | fp32 | fp32 channels-last | bf16 channels-last |")
    print("|---|---|---|---|")
    for size in (224, 64):
        print(f"| {size} px | {e[f'{size}px_fp32']:,.0f} | {e[f'{size}px_fp32_channels_last']:,.0f} | "
              f"{e[f'{size}px_bf16_channels_last']:,.0f} |")
    print()
    print("| head fit, 20,000 cached features, batch 32, 3 epochs | s per epoch (last) | µs per photo | peak GPU MB |")
    print("|---|---|---|---|")
    for f in g["head_fit"]:
        print(f"| {f['classes']:,} classes, {f['precision']}, strategy={f['strategy']} | {f['epoch_seconds'][-1]:.2f} | "
              f"{f['us_per_photo_last_epoch']:.0f} | {f['peak_gpu_mb']:.0f} |")
    ft = g["finetune_unfreeze1_bf16_channels_last"]
    print(f"\nfine-tune step unfreeze=1 bf16 channels-last: {ft}")


if __name__ == "__main__":
    main()
