"""`make bench` / `python bench/speed.py`: hsflow's speed figures measured side by side in one run.

    a. cache     the naive loop (backbone forward every epoch, as the study trained) vs hsflow's cached loop:
                 same dataset, backbone, epochs and seed; wall-clock ratio and both test top-1
    b. recommend hsflow.recommend photos/s from files on disk vs the raw network forward on tensors already in
                 memory, same batch size: what the input pipeline costs
    c. decode    photos/s of the input pipeline alone (decode with JPEG draft + preprocess, DataLoader workers)
    d. crawl     crawler rulings/s against the local portal stand-in with throttling off
    f. batch     (--only batch) the same --batch-photos photos through `hsflow.score --engine local`, `--engine
                 spark` at local[1] and local[2], and `make serve` (6 concurrent one-photo clients) on one logged
                 model (--batch-model; default: the champion, else the latest make-train model): photos/s once
                 started (n photos minus a 1-photo run: the fixed start-up cost, stated apart)
    e. runtimes  photos/s of the frozen prefixes (Lite0, Lite1, Lite2, make train's joined Lite1 + Lite0) at batch 1
                 and 32 in torch eager, torch channels-last, ONNX Runtime, OpenVINO (when installed) and, with
                 --compile, torch.compile (inductor; a minute or more of compiling per prefix and batch size, not
                 counted), interleaved in one process; each one's share of the machine's peak FLOP/s and its
                 largest difference from eager

Printed as a table and written to bench/results.json. Runs on CPU here and on the GPU where there is one.
Training runs go to the MLflow experiment `bench` in a temporary store (the project's store stays clean).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402

from hsflow.core.config import ROOT_DIR  # noqa: E402

SHARED_ARCHIVE = ROOT_DIR.parent / "shared" / "demo-portal"


def _train(overrides: list[str], tmp: Path, name: str) -> dict:
    """One `python -m hsflow.train` as a user runs it; wall-clock seconds and the run's test metrics."""
    args = [sys.executable, "-m", "hsflow.train", *overrides, f"logger.tracking_uri=sqlite:///{tmp}/mlflow.db",
            f"hydra.run.dir={tmp}/outputs/{name}", "logger.experiment_name=bench", f"logger.run_name={name}",
            "logger.log_model=false"]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    t0 = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT_DIR)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"bench training {name} failed: {proc.stderr.strip().splitlines()[-1:]}")
    fields = dict(kv.split("=") for kv in proc.stdout.strip().splitlines()[-1].split())
    return {"seconds": round(seconds, 1), "test_top1": float(fields["test_top1"]), "run_id": fields["run_id"]}


def bench_cache(dataset: str, model: str, epochs: int, tmp: Path) -> dict:
    common = [f"dataset={dataset}", f"model={model}", f"trainer.max_epochs={epochs}", "calibration.enabled=false"]
    print(f"[cache] cached loop, cold cache ({dataset}, {model}, {epochs} epochs) ...", file=sys.stderr)
    cold = _train([*common, "features=cached", f"paths.cache_dir={tmp}/cache"], tmp, "cached-cold")
    print("[cache] cached loop, warm cache ...", file=sys.stderr)
    warm = _train([*common, "features=cached", f"paths.cache_dir={tmp}/cache"], tmp, "cached-warm")
    print("[cache] naive loop (backbone forward every step) ...", file=sys.stderr)
    # its own empty cache folder: the naive run pays the same one-time work (photo checks, generated copies) as cold
    naive = _train([*common, "features=naive", f"paths.cache_dir={tmp}/cache-naive"], tmp, "naive")
    return {"cache_speedup": round(naive["seconds"] / cold["seconds"], 1),
            "cache_speedup_warm": round(naive["seconds"] / warm["seconds"], 1),
            "cached_top1": cold["test_top1"], "cached_warm_top1": warm["test_top1"], "naive_top1": naive["test_top1"],
            "naive_s": naive["seconds"], "cached_cold_s": cold["seconds"], "cached_warm_s": warm["seconds"],
            "cache_setting": f"{dataset} x {model} x {epochs} epochs"}


def _photos(n: int) -> list[Path]:
    photos = sorted((ROOT_DIR / "data" / "demo" / "photos").glob("*.jpg"))
    step = max(1, len(photos) // n)
    return photos[::step][:n]


def _model(name: str):
    """A full network (frozen backbone + a head) as recommend serves it; the head's weights do not matter here."""
    from hydra import compose, initialize_config_dir

    from hsflow.core.config import CONF_DIR
    from hsflow.data.transforms import preprocess_spec, spec_id
    from hsflow.models.backbones import build_backbone, split_backbone
    from hsflow.models.classifier import build_head
    from hsflow.models.bundle import HSModel
    from hsflow.models.network import assemble

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"model={name}"]).model
    pre = preprocess_spec(cfg)
    net = split_backbone(build_backbone(name, True), 0, spec_id(pre))
    classes = [f"{i:02d}00000000" for i in range(1, 43)]
    meta = {"backbone": name, "unfreeze": 0, "head": {"hidden": 0, "dropout": 0.5}, "classes": classes,
            "preprocess": pre, "tta": False, "temperature": 1.0, "review_threshold": 0.5}
    return HSModel(assemble(net.prefix, net.suffix, build_head(net.dim, len(classes), 0, 0.5)).eval(), meta)


def bench_recommend(model_name: str, n: int, batch_size: int) -> dict:
    from hsflow.serving import recommend as R
    from hsflow.data.loading import PhotoDataset
    from hsflow.core.images import open_rgb

    model = _model(model_name)
    files = _photos(n)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    R.recommend(model, files[:batch_size], batch_size=batch_size, device=device, progress=False)  # warm-up
    t0 = time.perf_counter()
    out = R.recommend(model, files, batch_size=batch_size, device=device, progress=False)
    rec_s = time.perf_counter() - t0
    assert all(r.error is None for r in out)

    # The raw forward: the same photos already decoded and preprocessed, in memory, same batch size.
    pre, draft = model.preprocess(), model.meta["preprocess"]["resize"]
    x = torch.stack([pre(open_rgb(f, draft_size=draft)) for f in files])
    model.net.to(device)
    with torch.inference_mode():
        model.probabilities(x[:batch_size].to(device))
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(0, len(x), batch_size):
            model.probabilities(x[i:i + batch_size].to(device))
        if device == "cuda":
            torch.cuda.synchronize()
        raw_s = time.perf_counter() - t0

    # Decode alone: the DataLoader training and recommend use, no network.
    from torch.utils.data import DataLoader

    from hsflow.data.builder import Sample
    from hsflow.data.loading import default_workers

    samples = [Sample(str(f), "", "", 0, "test") for f in files]
    loader = DataLoader(PhotoDataset(samples, pre, None, draft), batch_size=batch_size,
                        num_workers=default_workers(device))
    t0 = time.perf_counter()
    for _ in loader:
        pass
    dec_s = time.perf_counter() - t0
    return {"recommend_photos_per_s": round(n / rec_s, 1), "forward_photos_per_s": round(n / raw_s, 1),
            "recommend_vs_forward": round(raw_s / rec_s, 2), "decode_photos_per_s": round(n / dec_s, 1),
            "photos": n, "batch_size": batch_size}


def bench_crawl(archive: Path) -> dict:
    from crawler.bench import crawl_rulings_per_s

    r = crawl_rulings_per_s(archive)
    return {"crawl_rulings_per_s": r["rulings_per_s"], "crawl_photos_per_s": r["photos_per_s"],
            "crawl_rulings": r["rulings"], "crawl_seconds": r["seconds"], "crawl_archive": str(archive)}


# -- e. runtimes --------------------------------------------------------------------------------------------------
PREFIXES = {"lite0": (["efficientnet_lite0"], 224), "lite1": (["efficientnet_lite1"], 240),
            "lite2": (["efficientnet_lite2"], 260),
            "lite1+lite0 (make train)": (["efficientnet_lite1", "efficientnet_lite0"], 240)}


def machine_peak() -> dict:
    """Peak float32 FLOP/s = cores x clock x FLOP per cycle: 2 FMA units x (8 lanes with AVX2, 16 with AVX-512) x
    2 FLOP per FMA; the clock is /proc/cpuinfo's (the nominal one: turbo is not counted)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    mhz = next((float(line.split(":")[1]) for line in info.splitlines() if line.startswith("cpu MHz")), 0.0)
    flags = next((line.split(":")[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    lanes = 16 if "avx512f" in flags else 8 if "avx2" in flags and "fma" in flags else 4
    cores = min(torch.get_num_threads(), os.cpu_count() or 1)
    per_cycle = 2 * lanes * 2
    return {"cores": cores, "clock_ghz": round(mhz / 1000, 3), "flop_per_cycle": per_cycle,
            "peak_gflops": round(cores * mhz / 1000 * per_cycle, 1)}


def gflop_per_photo(prefix: torch.nn.Module, size: int) -> float:
    """Convolution and matrix-product FLOPs (2 per multiply-add) of one photo, counted by torch's FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        prefix(torch.zeros(1, 3, size, size))
    return counter.get_total_flops() / 1e9


def _engines(prefix: torch.nn.Module, size: int, tmp: Path, compiled: bool = False) -> dict:
    """name -> function of a float32 NCHW batch; every engine of this machine, the runtime's export done once;
    `compiled` adds torch.compile's (inductor: it compiles at its first call, in _photos_per_s's warm-up)."""
    import copy

    from hsflow.core import runtime as rt

    eager, last = copy.deepcopy(prefix).eval(), copy.deepcopy(prefix).eval().to(memory_format=torch.channels_last)
    engines = {"torch eager": lambda x: eager(x),
               "torch channels-last": lambda x: last(x.contiguous(memory_format=torch.channels_last))}
    path = rt.export(copy.deepcopy(prefix), torch.zeros(2, 3, size, size), tmp / f"{size}-{id(prefix)}.onnx",
                     ["features"])
    ort = rt.OnnxNetwork(path, torch.get_num_threads())
    engines["onnxruntime"] = lambda x: torch.from_numpy(ort.run(x.numpy())["features"])
    if compiled and not shutil.which(os.environ.get("CXX", "g++")):  # inductor builds C++ for the CPU
        print(f"warning: --compile: no C++ compiler ({os.environ.get('CXX', 'g++')}) on PATH, so no torch.compile row; "
              "apt-get install g++ (or set CXX)", file=sys.stderr, flush=True)
    elif compiled:  # a fresh graph per batch size: dynamic=False, as a server with a fixed batch would run it
        engines["torch.compile"] = torch.compile(copy.deepcopy(prefix).eval(), dynamic=False)
    try:
        import openvino as ov
    except ImportError:
        return engines
    compiled = ov.Core().compile_model(str(path), "CPU")
    engines["openvino"] = lambda x: torch.from_numpy(compiled(x.numpy())[0])
    return engines


def _photos_per_s(engines: dict, x: torch.Tensor, batch: int, rounds: int) -> tuple[dict, dict]:
    """Median photos/s per engine over `rounds` interleaved rounds (a shared CPU slows them all alike), and each
    engine's largest difference from torch eager on the same photos."""
    calls = [x[i: i + batch] for i in range(0, len(x), batch)][: max(1, 8 // len(x[:batch]))]
    speed: dict[str, list[float]] = {name: [] for name in engines}
    with torch.inference_mode():
        outputs = {name: fn(calls[0]) for name, fn in engines.items()}  # warm-up, and the outputs compared
        for _ in range(rounds):
            for name, fn in engines.items():
                started = time.perf_counter()
                for c in calls:
                    fn(c)
                speed[name].append(sum(len(c) for c in calls) / (time.perf_counter() - started))
    diff = {name: float((out - outputs["torch eager"]).abs().max()) for name, out in outputs.items()}
    return {name: sorted(v)[len(v) // 2] for name, v in speed.items()}, diff


def bench_runtimes(batches=(1, 32), rounds: int = 3, compiled: bool = False) -> dict:
    from hsflow.models.backbones import build_backbone, split_backbone

    peak, rows = machine_peak(), []
    photos = _photos(32)
    with tempfile.TemporaryDirectory(prefix="hsflow-bench-onnx-") as tmp:
        for label, (names, size) in PREFIXES.items():
            print(f"[runtimes] {label} ...", file=sys.stderr, flush=True)
            bbs = [build_backbone(n) for n in names]
            prefix = split_backbone(bbs[0], 0, "bench", bbs[1:]).prefix.eval()
            x = _batch(photos, size)
            gflop, engines = gflop_per_photo(prefix, size), _engines(prefix, size, Path(tmp), compiled)
            for batch in batches:
                speed, diff = _photos_per_s(engines, x, batch, rounds)
                rows += [{"prefix": label, "size": size, "batch": batch, "engine": name,
                          "photos_per_s": round(v, 1), "gflop_per_photo": round(gflop, 3),
                          "share_of_peak": round(v * gflop / peak["peak_gflops"], 3),
                          "vs_eager": round(v / speed["torch eager"], 2), "max_abs_diff": diff[name]}
                         for name, v in speed.items()]
    return {"runtimes": rows, "runtimes_peak": peak, "runtimes_rounds": rounds,
            "runtimes_load_average": [round(v, 1) for v in os.getloadavg()],  # other jobs on the same cores
            "onnxruntime_version": __import__("onnxruntime").__version__}


def _batch(files: list[Path], size: int) -> torch.Tensor:
    from hsflow.data.transforms import build_preprocess
    from hsflow.core.images import open_rgb

    pre = build_preprocess({"size": size, "resize": round(size * 256 / 224), "mean": [0.5] * 3, "std": [0.5] * 3})
    return torch.stack([pre(open_rgb(f, draft_size=size)) for f in files])


def runtimes_table(results: dict) -> str:
    peak = results["runtimes_peak"]
    lines = [f"peak {peak['peak_gflops']} GFLOP/s = {peak['cores']} cores x {peak['clock_ghz']} GHz x "
             f"{peak['flop_per_cycle']} FLOP/cycle", "",
             "| prefix | px | GFLOP/photo | batch | engine | photos/s | x eager | share of peak | max abs diff |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['prefix']} | {r['size']} | {r['gflop_per_photo']} | {r['batch']} | {r['engine']} | "
              f"{r['photos_per_s']} | {r['vs_eager']} | {r['share_of_peak']:.0%} | {r['max_abs_diff']:.1e} |"
              for r in results["runtimes"]]
    return "\n".join(lines)


def _score_s(model: str, folder: Path, out: Path, *args: str) -> float:
    """Wall-clock seconds of one `python -m hsflow.score` run over `folder` (every photo must be answered)."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "hsflow.score", "--model", model, "--output", str(out), *args,
                           str(folder)], cwd=ROOT_DIR, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return time.perf_counter() - t0


def bench_batch(model: str, n: int, tmp: Path) -> dict:
    """f. One batch of n photos through each door; a 1-photo run of each gives its fixed start-up cost."""
    sys.path.insert(0, str(ROOT_DIR / "bench"))
    from serve_latency import measure

    files = _photos(n) * (n // len(_photos(n)) + 1)
    many, one = tmp / "many", tmp / "one"
    for i, f in enumerate(files[:n]):  # repeated to n when the demo has fewer: each a file of its own
        (many / str(i % 10)).mkdir(parents=True, exist_ok=True)
        shutil.copy(f, many / str(i % 10) / f"{i}_{f.name}")
    one.mkdir()
    shutil.copy(files[0], one / files[0].name)
    out: dict = {"batch_photos": n, "batch_model": model, "batch_started": time.strftime("%Y-%m-%d %H:%M:%S")}
    for name, args in [("local", ["--engine", "local"]), ("spark_local1", ["--master", "local[1]"]),
                       ("spark_local2", ["--master", "local[2]"])]:
        print(f"[batch] {name} ...", file=sys.stderr)
        start_s = _score_s(model, one, tmp / "one.jsonl", *args)
        total_s = _score_s(model, many, tmp / "many.jsonl", *args)
        out |= {f"batch_{name}_startup_s": round(start_s, 1), f"batch_{name}_total_s": round(total_s, 1),
                f"batch_{name}_photos_per_s": round(n / max(total_s - start_s, 1e-9), 1)}
    print("[batch] make serve ...", file=sys.stderr)
    served = measure(model, "onnx", files[:50], requests=5, concurrent=6, per_client=max(1, n // 6))
    out |= {"batch_serve_photos_per_s": served["req_per_s_c6"], "batch_serve_startup_s": served["cold_start_ready_s"]}
    out["batch_spark2_vs_local"] = round(out["batch_spark_local2_photos_per_s"] / out["batch_local_photos_per_s"], 2)
    return out


def batch_table(r: dict) -> str:
    lines = ["| door (same photos, same model) | photos/s once started | fixed start-up (s) | wall, all photos (s) |",
             "|---|---|---|---|"]
    for name, label in [("local", "hsflow.score --engine local"), ("spark_local1", "hsflow.score --engine spark, "
                        "local[1]"), ("spark_local2", "hsflow.score --engine spark, local[2]")]:
        lines.append(f"| {label} | {r[f'batch_{name}_photos_per_s']} | {r[f'batch_{name}_startup_s']} | "
                     f"{r[f'batch_{name}_total_s']} |")
    lines.append(f"| make serve, 6 concurrent clients | {r['batch_serve_photos_per_s']} | "
                 f"{r['batch_serve_startup_s']} (ready) | |")
    return "\n".join(lines) + f"\n\n{r['batch_photos']} photos; local[2] / local: {r['batch_spark2_vs_local']}"


def table(results: dict) -> str:
    rows = [("a", "naive / cached (cold cache) wall-clock", "cache_speedup", "x"),
            ("a", "naive / cached (warm cache) wall-clock", "cache_speedup_warm", "x"),
            ("a", "cached test top-1", "cached_top1", ""), ("a", "naive test top-1", "naive_top1", ""),
            ("b", "recommend / raw forward (photos/s)", "recommend_vs_forward", ""),
            ("b", "recommend photos/s", "recommend_photos_per_s", ""),
            ("b", "raw forward photos/s", "forward_photos_per_s", ""),
            ("c", "decode photos/s", "decode_photos_per_s", ""),
            ("d", "crawl rulings/s (stand-in, no throttle)", "crawl_rulings_per_s", "")]
    lines = ["| | measure | value |", "|---|---|---|"]
    lines += [f"| {k} | {label} | {results[key]}{unit} |" for k, label, key, unit in rows if key in results]
    parts = ["\n".join(lines)] if len(lines) > 2 else []
    parts += [batch_table(results)] if "batch_local_photos_per_s" in results else []
    return "\n\n".join(parts + ([runtimes_table(results)] if "runtimes" in results else []))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python bench/speed.py", description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="demo_ch08_balanced")
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--photos", type=int, default=320, help="photos for the recommend/decode figures")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--archive", type=Path, default=SHARED_ARCHIVE if SHARED_ARCHIVE.is_dir()
                    else ROOT_DIR / "data" / "demo", help="what the crawler benchmark crawls")
    ap.add_argument("--only", default="cache,recommend,crawl,runtimes,batch", help="comma-separated subset")
    ap.add_argument("--batch-photos", type=int, default=1000, help="f. batch: photos (the demo's, repeated)")
    ap.add_argument("--batch-model", default=None, help="f. batch: the logged model (runs:/..., models:/...)")
    ap.add_argument("--out", type=Path, default=ROOT_DIR / "bench" / "results.json")
    ap.add_argument("--compile", action="store_true",
                    help="runtimes: add torch.compile (inductor) beside eager and ONNX Runtime (minutes of compiling)")
    args = ap.parse_args(argv)
    parts = set(args.only.split(","))
    results: dict = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else
                     f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})",
                     "torch_threads": torch.get_num_threads(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                     "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_")}  # see hsflow/__init__.py
    with tempfile.TemporaryDirectory(prefix="hsflow-bench-") as tmp:
        if "cache" in parts:
            results |= bench_cache(args.dataset, args.model, args.epochs, Path(tmp))
    if "recommend" in parts:
        print("[recommend/decode] ...", file=sys.stderr)
        results |= bench_recommend(args.model, args.photos, args.batch_size)
    if "crawl" in parts:
        print("[crawl] ...", file=sys.stderr)
        results |= bench_crawl(args.archive)
    if "batch" in parts:
        from hsflow.serving.registry import default_model_uri

        with tempfile.TemporaryDirectory(prefix="hsflow-bench-") as tmp:
            results |= bench_batch(args.batch_model or default_model_uri(), args.batch_photos, Path(tmp))
    if "runtimes" in parts:
        results |= bench_runtimes(compiled=args.compile)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(args.out.read_text()) if args.out.is_file() else {}
    args.out.write_text(json.dumps(previous | results, indent=1) + "\n")  # a partial run keeps older figures
    print(table(results))
    print(f"(written to {args.out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
