"""Precedent figures for docs/recommend.md: `python studies/precedent_figures.py <run id>` over a make-train run (its 2019
(dated) test photos, through hsflow.recommend with precedents), and the size of each file in its model folder."""
import csv
import sys
import tempfile
import time
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from hsflow.serving import recommend as R
from hsflow.core.config import default_tracking_uri

if len(sys.argv) != 2 or sys.argv[1].startswith("-"):
    sys.exit("usage: python studies/precedent_figures.py RUN_ID  (a make-train run in the project's tracking store)")
run_id = sys.argv[1]
client = MlflowClient(default_tracking_uri())
metrics = client.get_run(run_id).data.metrics
tmp = tempfile.mkdtemp()
rows = [r for r in csv.DictReader(open(client.download_artifacts(run_id, "dataset/split.csv", tmp)))
        if r["split"] == "test" and r["view"] == "0"]
model = R.load(f"runs:/{run_id}/model")
t0 = time.perf_counter()
recs = R.recommend(model, [r["path"] for r in rows], top_k=5, precedents=3)
print(f"recommend {len(rows)} photos with precedents: {time.perf_counter() - t0:.1f} s")
n = len(rows)
cls = [rec.candidates[0]["hs_code"] == r["hs_code"] for rec, r in zip(recs, rows)]
pre = [rec.precedents[0]["hs_code"] == r["hs_code"] for rec, r in zip(recs, rows)]
pre3 = [any(p["hs_code"] == r["hs_code"] for p in rec.precedents) for rec, r in zip(recs, rows)]
agree = [rec.precedent_agrees for rec in recs]
print("test photos", n, "rulings", len({r["rrdc_no"] for r in rows}))
print("metric test/top1", metrics["test/top1"], "recomputed", sum(cls) / n)
print("metric test/precedent_top1", metrics.get("test/precedent_top1"), "recomputed", sum(pre) / n)
print("a precedent among 3 has the true code", sum(pre3) / n)
na = sum(agree)
print(f"agree {na}/{n}; classifier top-1 when agree {sum(c for c, a in zip(cls, agree) if a)}/{na}; "
      f"when disagree {sum(c for c, a in zip(cls, agree) if not a)}/{n - na}; "
      f"precedent right when disagree {sum(p for p, a in zip(pre, agree) if not a)}/{n - na}")
# per ruling: its photos as one item
items = [R.PhotoInput(r["path"], item=r["rrdc_no"]) for r in rows]
truth = {r["rrdc_no"]: r["hs_code"] for r in rows}
groups = R.recommend(model, items, top_k=1, precedents=1)
gp = [g.precedents[0]["hs_code"] == truth[g.image] for g in groups]
gc = [g.candidates[0]["hs_code"] == truth[g.image] for g in groups]
print(f"per ruling: classifier {sum(gc)}/{len(groups)}, nearest precedent {sum(gp)}/{len(groups)}")
folder = Path(mlflow.artifacts.download_artifacts(f"runs:/{run_id}/model", dst_path=tempfile.mkdtemp()))
for f in sorted((folder / "artifacts").iterdir()):
    print(f.name, f.stat().st_size)
print("index photos", len(model.precedents), "rulings", len(model.precedents.rulings))
