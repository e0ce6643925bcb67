"""Collect bench/scale.sh's measurements into bench/scale_<codes>.json: `python bench/scale_summary.py WORK N M`."""
import json
import os
import sys
from pathlib import Path

work, n, m = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])


def t(name):
    """/usr/bin/time's wall seconds, peak RSS (KiB), user and system seconds of one stage's process."""
    wall, rss, user, sys_ = (work / f"{name}.time").read_text().split()[-4:]
    return {"seconds": float(wall), "cpu_seconds": round(float(user) + float(sys_), 2),
            "peak_rss_mb": round(int(rss) / 1024, 1)}


def train(name, timings):
    """One training process: its own stages (hsflow.core.timing) and the fit's cost per training photo and epoch."""
    stages = json.loads((work / timings).read_text())["stages"]
    err = (work / f"{name}.err").read_text().splitlines()
    fit = next(s for s in stages if s["stage"] == "fit")
    return {"process": t(name), "stages": stages,
            "last_line": (work / f"{name}.out").read_text().strip().splitlines()[-1],
            "dataset_summary": [ln[:400] for ln in err if ln.startswith(
                ("dataset ", "  catch_all", "  dropped", "  train_only", "  near-duplicate"))][:12],
            "plot_warnings": [ln for ln in err if ln.startswith("warning: ") and "not logged" in ln],
            "fit_epoch_cpu_us_per_photo": [round(c / fit["train_photos"] * 1e6, 1) for c in fit["epoch_cpu_seconds"]],
            "fit_epoch_wall_us_per_photo": [round(c / fit["train_photos"] * 1e6, 1) for c in fit["epoch_seconds"]]}


info = json.loads((work / "info.out").read_text())
out = {"archive": json.loads((work / "generate.out").read_text()),
       "store": {k: info[k] for k in ("rulings", "photos", "codes", "undecodable_photos")},
       "machine": {"cpus": os.cpu_count(), "load_average_at_end": os.getloadavg(),
                   "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
       "stages": {k: t(k) for k in ("generate", "import", "info", "report", "recommend")},
       "train": train("train", "timings.json")}
if (work / "train_all_codes.time").is_file():
    out["train_all_codes"] = train("train_all_codes", "timings_all_codes.json")
end = [out["stages"][k] for k in ("import", "info", "report", "recommend")] + [out["train"]["process"]]
out["end_to_end_seconds"] = round(sum(s["seconds"] for s in end), 1)
out["end_to_end_cpu_seconds"] = round(sum(s["cpu_seconds"] for s in end), 1)
out["peak_rss_mb"] = max(s["peak_rss_mb"] for s in end)
Path(f"bench/scale_{m}.json").write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
print(json.dumps({k: out[k] for k in ("end_to_end_seconds", "end_to_end_cpu_seconds", "peak_rss_mb")}))
