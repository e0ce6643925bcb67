"""hsflow's commands restart once with glibc told to keep freed feature-map memory (hsflow/__init__.py); library
imports and opted-out runs are left alone."""
import json
import os
import subprocess
import sys

import pytest

from conftest import PY, ROOT

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="glibc malloc settings")


def bench_runtime(tmp_path, **env):
    """`python -m hsflow.recommend --help` as a user types it; a sitecustomize on PYTHONPATH reports, at exit, the
    malloc setting of the process that finally ran (after any restart)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "HSFLOW_MALLOC"))}
    out = tmp_path / "r.json"
    (tmp_path / "sitecustomize.py").write_text(
        "import atexit, json, os\n"
        f"atexit.register(lambda: open({str(out)!r}, 'w').write(json.dumps("
        "{'malloc_mmap_threshold': os.environ.get('MALLOC_MMAP_THRESHOLD_')})))\n")
    proc = subprocess.run([PY, "-m", "hsflow.recommend", "--help"], cwd=ROOT,
                          env={**clean, **env, "PYTHONPATH": str(tmp_path)}, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(out.read_text())


def test_entry_point_restarts_with_the_heap_kept(tmp_path):
    assert bench_runtime(tmp_path)["malloc_mmap_threshold"] == str(4 << 30)


def test_opt_out_and_library_import_leave_malloc_alone(tmp_path):
    assert bench_runtime(tmp_path, HSFLOW_MALLOC="0")["malloc_mmap_threshold"] is None
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    proc = subprocess.run([PY, "-c", "import os, hsflow; print(os.environ.get('MALLOC_MMAP_THRESHOLD_'))"],
                          env=clean, capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "None"
