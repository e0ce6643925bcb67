"""Two nodes on this machine: `torchrun --nnodes=2 --nproc_per_node=1` twice on 127.0.0.1 (gloo), as a team with two
boxes tries it. What must hold: both exit 0; each rank extracts about half the photos into the shared cache; the cache
two ranks wrote holds the same features as one process's; one MLflow run, whose test top-1 lies within the
one-process run's 95 % interval (the fit differs: each rank draws its own dropout and DistributedSampler shuffles).
"""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch

from conftest import ROOT, free_port, tiny_overrides
from hsflow.data.features import FeatureCache

TORCHRUN = Path(sys.executable).with_name("torchrun")
NODES = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=1", "trainer.num_nodes=2",
         "trainer.precision=32-true", "trainer.max_epochs=3"]  # tiny_run's epochs


def two_nodes(overrides: list[str], timeout: int = 600) -> list[subprocess.CompletedProcess]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"NO_ALBUMENTATIONS_UPDATE": "1"}
    procs = [subprocess.Popen([str(TORCHRUN), "--nnodes=2", "--nproc_per_node=1", f"--node_rank={rank}",
                               "--master_addr=127.0.0.1", f"--master_port={port}", "-m", "hsflow.train", *overrides],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in (0, 1)]
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        if any(p.poll() for p in procs):  # one node failed: the other would wait for it in the rendezvous
            break
        time.sleep(1)
    for p in procs:
        if p.poll() is None:
            p.kill()
    outs = [p.communicate()[0] for p in procs]
    return [subprocess.CompletedProcess(p.args, p.returncode, out) for p, out in zip(procs, outs)]


def cache_items(cache: Path) -> dict[str, torch.Tensor]:
    items = {}
    for shard in cache.glob("features/*/*.pt"):
        data = torch.load(shard, weights_only=True)
        items.update(zip(data["keys"], data["feats"]))
    return items


@pytest.mark.slow
def test_two_nodes_split_the_extraction_and_match_one_process(tiny_run, session_cache, tmp_path):
    cache, tracking = tmp_path / "cache", tmp_path / "mlflow"
    nodes = two_nodes(tiny_overrides(tiny_run["store"], cache, tracking, *NODES))
    for rank, proc in enumerate(nodes):
        assert proc.returncode == 0, (rank, proc.stdout[-4000:])
    counts = {}
    for proc in nodes:
        (found,) = re.findall(r"rank (\d)/2: extracted (\d+) of (\d+) photos into the shared cache", proc.stdout)
        counts[int(found[0])] = (int(found[1]), int(found[2]))
    total = counts[0][1]
    assert counts[1][1] == total > 20 and counts[0][0] + counts[1][0] == total  # each photo extracted once
    assert abs(counts[0][0] - counts[1][0]) <= 2, counts                        # about half each

    two, one = cache_items(cache), cache_items(session_cache)
    assert len(two) == total and set(two) <= set(one)
    for key in sorted(two):
        assert torch.allclose(two[key], one[key], atol=1e-6, rtol=0), key

    client = mlflow.MlflowClient(f"sqlite:///{tracking}/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # rank 1 fitted and left: no run of its own
    assert runs[0].data.params["trainer.num_nodes"] == "2"
    lines = [ln for proc in nodes for ln in proc.stdout.splitlines() if ln.startswith("run_id=")]
    assert lines == [f"run_id={runs[0].info.run_id} test_top1={runs[0].data.metrics['test/top1']:.4f}"]
    single = mlflow.MlflowClient(tiny_run["tracking_uri"]).get_run(tiny_run["run_id"]).data.metrics
    assert single["test/top1_ci_low"] <= runs[0].data.metrics["test/top1"] <= single["test/top1_ci_high"]
    timings = client.download_artifacts(runs[0].info.run_id, "timings.json", str(tmp_path))
    features = next(s for s in json.loads(Path(timings).read_text())["stages"] if s["stage"] == "features")
    assert features["shares"] == 2 and features["extracted"] == counts[0][0]  # rank zero's own share, logged


def test_the_wait_reads_other_processes_shards_and_names_what_is_missing(tmp_path):
    """The barrier in-process: a second FeatureCache on the same folder (another rank) sees the first one's shard
    once written, and a share that never comes ends with one line, not a hang."""
    mine, other = FeatureCache(tmp_path, "x"), FeatureCache(tmp_path, "x")
    other.add(["a", "b"], torch.ones(2, 3))
    mine.wait_for(["a", "b"], stall_s=5)
    assert torch.equal(mine.items["b"], torch.ones(3)) and mine.added == 0 and other.added == 2
    with pytest.raises(TimeoutError, match="1 photos' features still missing after 0 s without a new shard"):
        mine.wait_for(["a", "c"], stall_s=0.2, poll_s=0.05)
