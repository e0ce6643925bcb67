"""`make serve`'s latency and throughput, torch against ONNX Runtime, in one run (loopback only, bounded loops):
`.venv/bin/python bench/serve_latency.py [--model URI|folder] [--requests 40] [--concurrent 6]`.

For each runtime (HSFLOW_RUNTIME=torch: the saved network in torch; onnx: network.onnx under ONNX Runtime, the
default) it starts `python -m hsflow.serve` (mlflow models serve, one worker) on a free port, times the cold start
(process start to the first /ping answered, then to the first answer), sends `--requests` one-photo requests one
after another (client-to-answer latency p50/p95 at concurrency 1), then `--concurrent` clients sending
`--per-client` one-photo requests each at once (requests/s at that concurrency), and stops the server; `onnx:2`
runs two server processes (`--workers 2`, each ONNX Runtime session on half the cores). Photos are
demo photos as base64, `top_k` 3. Writes bench/serve_latency.json and prints a table (docs/benchmarks.md).
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def body(photo: Path) -> bytes:
    return json.dumps({"dataframe_split": {"columns": ["image", "name"],
                                           "data": [[base64.b64encode(photo.read_bytes()).decode(), photo.name]]},
                       "params": {"top_k": 3}}).encode()


def ask(url: str, data: bytes) -> float:
    started = time.perf_counter()
    req = urllib.request.Request(url + "/invocations", data, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        answer = json.loads(resp.read())
    assert not answer["predictions"][0]["error"], answer
    return time.perf_counter() - started


def start(model: str, runtime: str, port: int, log, workers: int = 1) -> tuple[subprocess.Popen, float]:
    env = {**os.environ, "HSFLOW_RUNTIME": runtime}
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "hsflow.serve", "--model", model, "--port", str(port),
                             "--workers", str(workers)], cwd=ROOT,
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5)
            return proc, time.perf_counter() - started
        except OSError:
            if proc.poll() is not None or time.perf_counter() - started > 300:
                log.seek(0)
                raise RuntimeError(f"server ({runtime}) did not start:\n{log.read()[-2000:]}")
            time.sleep(0.2)


def quantile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def measure(model: str, spec: str, photos: list[Path], requests: int, concurrent: int, per_client: int) -> dict:
    runtime, _, workers = spec.partition(":")  # onnx:2 = two server processes (make serve --workers 2)
    workers = int(workers or 1)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    bodies = [body(p) for p in photos]
    with tempfile.TemporaryFile("w+") as log:
        proc, ready_s = start(model, runtime, port, log, workers)
        try:
            first_s = ready_s + ask(url, bodies[0])
            ask(url, bodies[1])  # warm
            one = [ask(url, bodies[i % len(bodies)]) for i in range(requests)]
            jobs = [bodies[i % len(bodies)] for i in range(concurrent * per_client)]
            t0 = time.perf_counter()
            with ThreadPoolExecutor(concurrent) as pool:
                list(pool.map(lambda b: ask(url, b), jobs))
            wall = time.perf_counter() - t0
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)
    return {"runtime": runtime, "workers": workers, "cold_start_ready_s": round(ready_s, 2), "cold_start_first_answer_s": round(first_s, 2),
            "p50_ms": round(1000 * quantile(one, 0.5), 1), "p95_ms": round(1000 * quantile(one, 0.95), 1),
            "requests_c1": requests, f"req_per_s_c{concurrent}": round(len(jobs) / wall, 2),
            "requests_concurrent": len(jobs), "concurrency": concurrent}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="default: what make serve serves (hsflow.serving.registry.default_model_uri)")
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--concurrent", type=int, default=6)
    ap.add_argument("--per-client", type=int, default=8)
    ap.add_argument("--runtimes", default="torch,onnx,onnx:2",
                    help="runtime[:server processes], comma-separated (onnx:2 = make serve ARGS='--workers 2')")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "serve_latency.json")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from hsflow.serving.registry import default_model_uri

    model = args.model or default_model_uri()
    photos = sorted((ROOT / "data" / "demo" / "photos").glob("*.jpg"))[::97][:16]
    rows = [measure(model, r, photos, args.requests, args.concurrent, args.per_client)
            for r in args.runtimes.split(",")]
    result = {"model": model, "cpu_cores": os.cpu_count(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "rows": rows}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for r in rows:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
