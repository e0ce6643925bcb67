"""`python -m hsflow.score [--engine spark|local] [--model URI] --output OUT DIR...`: a batch of photos scored.

One answer a photo, the JSON object of `hsflow.recommend --format json` (the same function answers): OUT.jsonl
holds one JSON line a photo; OUT.parquet columns image, outcome, error and answer (that JSON). A photo that cannot
be used is an answer with its `error`; the rest of the batch goes on.

--engine spark: Spark's `binaryFile` source reads the photos (recursively, image names only) and the logged MLflow
model scores them through MLflow's own door, `mlflow.pyfunc.spark_udf` with `params={"result": "json"}` (the
logged output schema: one string column), one row out per photo. Spark `local[2]` is the embedded default;
`--master spark://host:7077` or `yarn` runs on a cluster. Each Spark task runs ONNX Runtime on one thread (Spark
runs one task a core) over Arrow batches of at most --batch-size photos, and each Python worker loads the model
once (hsflow.serving.pyfunc). `--env-manager virtualenv|uv` rebuilds the model's logged environment on each node;
its input then crosses as JSON, so the photos go base64. --engine local: the same answers in this process.

--group-by folder: one answer a folder, as `hsflow.recommend --group-by folder` gives it (a failed photo keeps its
error row): every photo is scored through the model first, one row each, then Spark groups them by folder and
sends each group back through the model for its answer.

Exit status: 0 every photo answered, 1 some photo failed (its error row), 2 usage error (no photo folder, no
model, no Java or pyspark for --engine spark, no pyenv/uv for --env-manager, a model too old to group in Spark).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

from hsflow.core.runtime import THREADS_ENV
from hsflow.serving.recommend import IMAGE_EXTS, _global_tracking_uri, default_model, expand, tracking_uri

ENGINES = ("spark", "local")
ENV_MANAGERS = ("local", "virtualenv", "uv")
# A Spark task's photos by default: small enough for a progress line and a cheap retry, large enough that the
# pyfunc's set-up per task (the model itself is loaded once a worker) stays small.
PHOTOS_PER_TASK = 500
# binaryFile's pathGlobFilter is case-sensitive: both cases of every image extension hsflow.recommend reads.
IMAGE_GLOB = "*.{" + ",".join(sorted(e[1:] for ext in IMAGE_EXTS for e in (ext, ext.upper()))) + "}"


def spark_missing(env_manager: str = "local") -> str | None:
    """Why Spark (and the environment manager asked for) cannot start here, in one line saying what to install;
    None when it can. uv installed by pip beside this Python but not on PATH (a venv not activated) is put on
    PATH, where MLflow looks for it."""
    try:
        import pyspark  # noqa: F401
    except ImportError:
        return "pyspark is not installed: pip install -e '.[spark]' (or use --engine local)"
    java = Path(os.environ["JAVA_HOME"], "bin", "java") if os.environ.get("JAVA_HOME") else shutil.which("java")
    if not java or not Path(java).is_file():
        return ("no Java runtime for Spark (needs Java 17+): apt-get install openjdk-17-jre-headless, or set "
                "JAVA_HOME (or use --engine local)")
    if env_manager == "uv" and not shutil.which("uv"):
        bin_dir = os.path.dirname(sys.executable)  # pip installs uv's command beside this environment's python
        if not (Path(bin_dir) / "uv").is_file():
            return "--env-manager uv needs uv: pip install uv (or --env-manager local)"
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    if env_manager == "virtualenv" and not shutil.which("pyenv"):
        return ("--env-manager virtualenv needs pyenv (MLflow installs the model's Python with it): "
                "https://github.com/pyenv/pyenv#installation, or --env-manager uv")
    return None


def spark_session(master: str, batch_size: int):
    """An embedded or cluster Spark session for scoring: no UI, Arrow batches of at most `batch_size` photos."""
    # pyspark 4.3 warns at every pandas UDF that it is not tested on pandas 3; hsflow's tests check its answers.
    warnings.filterwarnings("ignore", message="PySpark does not yet fully support pandas")
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")  # local[N] binds the loopback only
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # workers: this environment, not the system's python3
    from pyspark.sql import SparkSession

    spark = (SparkSession.builder.master(master).appName("hsflow.score")
            .config("spark.ui.enabled", "false")
            .config("spark.ui.showConsoleProgress", "false")  # hsflow prints its own progress lines
            .config("spark.sql.execution.arrow.pyspark.enabled", "true")
            .config("spark.sql.execution.arrow.maxRecordsPerBatch", str(batch_size))
            .config("spark.sql.files.maxPartitionBytes", str(8 << 20))  # photos are small: spread them
            .getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")  # Spark's INFO/WARN lines would drown hsflow's one-line errors
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # (the workers: MLFLOW_LOGGING_LEVEL above)
    return spark


def lend_this_python_to_pyenv() -> None:
    """env_manager=virtualenv: MLflow has pyenv install the model's Python under a fresh root in its temp folder
    (<MLflow's temp dir>/envs/pyenv_root), which downloads and builds it from python.org: minutes, and impossible
    offline. pyenv's `install --skip-existing` skips a version whose bin/ folder is there, so the Python this
    process runs is put there under its version: a model logged with this Python (make train's, with the same
    pinned environment) builds its virtualenv without a download; a model asking for another version still gets
    pyenv's. Only the driver's environment is prepared this way; on a cluster each node's pyenv needs the version
    (or --env-manager uv with a reachable index). (MLflow keeps that temp folder once a process: the first call
    of get_or_create_tmp_dir here is the one spark_udf uses.)"""
    import platform

    from mlflow.utils.file_utils import get_or_create_tmp_dir

    bin_dir = Path(get_or_create_tmp_dir(), "envs", "pyenv_root", "versions", platform.python_version(), "bin")
    if not bin_dir.exists():
        bin_dir.mkdir(parents=True)
        (bin_dir / "python").symlink_to(os.path.realpath(getattr(sys, "_base_executable", sys.executable)))


def spark_answers(spark, uri: str, folders: list[str], args, served_as: dict):
    """A DataFrame (image, answer) of one JSON answer a photo (or a folder, --group-by folder), scored by the logged
    model through spark_udf, computed and kept by Spark (scored_in_parallel) for the driver to stream."""
    import mlflow.pyfunc
    from pyspark.sql import functions as F

    photos = (spark.read.format("binaryFile").option("recursiveFileLookup", "true")
              .option("pathGlobFilter", IMAGE_GLOB).load(folders)
              .select(F.regexp_replace("path", "^file:", "").alias("name"), "content"))
    tasks = args.partitions or default_partitions(len(photos.inputFiles()), spark.sparkContext.defaultParallelism)
    photos = sized(photos, tasks)
    # The groups' shuffle (--group-by) in as many tasks, not Spark's 200: each task sets up the model's door, and
    # Spark does not merge the small partitions of a plan it keeps (persist).
    spark.conf.set("spark.sql.shuffle.partitions", str(tasks))
    # virtualenv/uv: the rows cross to the model's own environment as JSON; MLflow's scoring server decodes a
    # base64 string in the binary `image` column. In-process (local), the bytes go as they are.
    image = F.col("content") if args.env_manager == "local" else F.base64("content")
    if args.env_manager == "virtualenv":
        lend_this_python_to_pyenv()
    precedents = -1 if args.precedents is None else args.precedents

    def door(**params):
        return mlflow.pyfunc.spark_udf(
            spark, uri, result_type="string", env_manager=args.env_manager,
            params={"top_k": args.top_k, "precedents": precedents, **params},
            extra_env={THREADS_ENV: "1"},  # one ORT thread a task: Spark already runs one task a core
            model_config={"served_as": served_as, "read_paths": False})

    photo = F.struct(image.alias("image"), "name")
    if args.group_by == "none":
        return scored_in_parallel(photos.select(F.col("name").alias("image"), door(result="json")(photo)
                                                .alias("answer")))
    # --group-by folder: one row a photo through the model (result "parts": what a group's answer needs), then the
    # photos grouped by folder in Spark and each group sent back through the model for its answer. A failed photo
    # keeps its own error row, as `hsflow.recommend --group-by folder` writes it.
    parts = scored_in_parallel(photos.select("name", F.regexp_extract("name", r"^(.*)/[^/]*$", 1).alias("item"),
                                             door(result="parts")(photo).alias("parts")))
    failed = parts.where(F.get_json_object("parts", "$.error").isNotNull()).select(
        F.col("name").alias("image"), F.col("parts").alias("answer"))
    groups = parts.groupBy("item").agg(F.sort_array(F.collect_list(F.struct("name", "parts"))).alias("photos"))
    members = F.concat(F.lit("["), F.array_join(F.transform("photos", lambda p: p["parts"]), ","), F.lit("]"))
    answered = groups.select(F.col("item").alias("image"), door(result="json", group_key="folder")(
        F.struct("item", members.alias("members"))).alias("answer"))
    return scored_in_parallel(failed.unionByName(answered))


def default_partitions(photos: int, cores: int, per_task: int = PHOTOS_PER_TASK) -> int:
    """Tasks of at most `per_task` photos, a multiple of the cores so that no core idles through a last round."""
    return min(max(1, photos), cores * max(1, math.ceil(photos / (cores * per_task))))


def sized(frame, partitions: int):
    """`frame` in `partitions` partitions. Fewer than the file scan made (it makes one per few small photos): merged
    where they are read (coalesce, no shuffle of the photo bytes); more: a shuffle spreads them."""
    have = frame.rdd.getNumPartitions()
    return frame.coalesce(partitions) if partitions < have else frame.repartition(partitions) if partitions > have \
        else frame


def scored_in_parallel(answers, every: float = 10.0):
    """`answers` computed on every core at once and kept by Spark (memory, then disk), so that the driver then
    streams them one partition at a time. (Iterating the plan itself computes its partitions one after another:
    toLocalIterator runs a job per partition, so one core scored while the others idled.) A line of task progress
    every `every` seconds."""
    import threading

    from pyspark import StorageLevel

    answers = answers.persist(StorageLevel.MEMORY_AND_DISK)
    tracker, done, start = answers.sparkSession.sparkContext.statusTracker(), threading.Event(), time.perf_counter()

    def report():
        last = None
        while not done.wait(every):
            stages = [tracker.getStageInfo(i) for i in tracker.getActiveStageIds()]
            now = [(s.numCompletedTasks, s.numTasks) for s in stages if s is not None]
            if now and now != last:
                finished, total = map(sum, zip(*now))
                print(f"scoring: {finished}/{total} tasks done ({time.perf_counter() - start:.0f} s)",
                      file=sys.stderr, flush=True)
                last = now

    thread = threading.Thread(target=report, daemon=True)
    thread.start()
    try:
        answers.count()
    finally:
        done.set()
    return answers


def write_rows(rows, output: Path, progress) -> tuple[int, int]:
    """(image, answer JSON) rows to OUT.jsonl (a line each) or OUT.parquet; (answers, failed)."""
    n = failed = 0
    records = []
    with (open(output, "w", encoding="utf-8") if output.suffix != ".parquet" else _Null()) as out:
        for image, answer in rows:
            d = json.loads(answer)
            n, failed = n + 1, failed + bool(d.get("error"))
            if output.suffix == ".parquet":
                records.append({"image": image, "outcome": d.get("outcome"), "error": d.get("error"),
                                "answer": answer})
            else:
                out.write(answer + "\n")
            progress(n)
    if output.suffix == ".parquet":
        import pandas as pd

        pd.DataFrame(records, columns=["image", "outcome", "error", "answer"]).to_parquet(output, index=False)
    return n, failed


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _progress(every: int = 500):
    start, first = time.perf_counter(), [None]

    def tick(n: int):
        if first[0] is None:
            first[0] = time.perf_counter() - start
            print(f"first answer after {first[0]:.1f} s", file=sys.stderr, flush=True)
        if n % every == 0:
            print(f"{n} photos scored ({time.perf_counter() - start:.1f} s)", file=sys.stderr, flush=True)
    return tick, start, first


class Refused(Exception):
    """A batch that cannot start, in one line saying why and what to do (exit status 2)."""


def groups_after_scoring(uri: str) -> bool:
    """Whether the logged model answers a group sent back to it (result "parts", the `members` column)."""
    from mlflow.models import Model

    signature = Model.load(uri).signature  # the MLmodel file alone (a local folder, runs:/, models:/)
    return signature is not None and "members" in signature.inputs.input_names()


def run_spark(args, uri: str, folders: list[str]) -> tuple[int, int]:
    from hsflow.serving.registry import identify

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # stderr is for hsflow's lines
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # not an INFO line a batch from every Spark task
    store = tracking_uri()
    with _global_tracking_uri(store):  # spark_udf downloads runs:/ and models:/ URIs through the global one
        uri, served_as = identify(uri, store)
        if args.group_by != "none" and not groups_after_scoring(uri):
            raise Refused(f"{uri}: this model was logged before hsflow.score could group in Spark (its signature "
                          "has no `members` input): retrain it (make train), use --engine local, or score without "
                          "--group-by")
        spark = spark_session(args.master, args.batch_size)
        try:
            print(f"scoring on Spark {args.master} ({args.env_manager} environment)", file=sys.stderr, flush=True)
            answers = spark_answers(spark, uri, folders, args, served_as)
            tick, *_ = _progress()
            # toLocalIterator: the driver holds one partition's answers at a time, however many photos.
            return write_rows(((r.image, r.answer) for r in answers.toLocalIterator()), args.output, tick)
        finally:
            if not args.keep_session:
                spark.stop()


def run_local(args, uri: str, folders: list[str]) -> tuple[int, int]:
    from hsflow.serving.recommend import iter_recommend, load, to_json

    model = load(uri)
    files = [f.resolve() for f in expand(folders)]  # named as binaryFile names them: absolute paths
    tick, *_ = _progress()
    recs = iter_recommend(model, files, args.top_k, batch_size=args.batch_size, precedents=args.precedents,
                          group_by=args.group_by, progress=False)
    return write_rows(((r.image, to_json(r)) for r in recs), args.output, tick)


def parse(argv):
    ap = argparse.ArgumentParser(prog="python -m hsflow.score", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", choices=ENGINES, default="spark")
    ap.add_argument("--master", default="local[2]",
                    help="Spark master: local[N] embedded (default local[2]), spark://host:7077, yarn")
    ap.add_argument("--model", default=None, help="runs:/<run id>/model, models:/<name>@<alias> ... (default: the "
                    "registered model's champion, else the latest `make train` model)")
    ap.add_argument("--registered-model", default=None, metavar="NAME")
    ap.add_argument("--output", type=Path, required=True, help="OUT.jsonl (JSON lines) or OUT.parquet")
    ap.add_argument("--partitions", type=int, default=None, help="Spark partitions (default: tasks of at most "
                    f"{PHOTOS_PER_TASK} photos, a multiple of the cores)")
    ap.add_argument("--env-manager", choices=ENV_MANAGERS, default="local",
                    help="spark_udf's: local (this environment) or the model's logged one rebuilt by virtualenv/uv")
    ap.add_argument("--batch-size", type=int, default=64, help="photos an Arrow batch / a forward (default 64)")
    ap.add_argument("--group-by", choices=("none", "folder"), default="none",
                    help="folder: one answer for each folder's photos, as `hsflow.recommend --group-by folder` "
                    "(grouped in Spark after every photo is scored)")
    ap.add_argument("--top-k", type=int, default=5)
    ap.add_argument("--precedents", type=int, default=None, metavar="N")
    ap.add_argument("--keep-session", action="store_true", help=argparse.SUPPRESS)  # tests and bench reuse it
    ap.add_argument("folders", nargs="+", metavar="DIR", help="photo folders (searched recursively) or files")
    args = ap.parse_args(argv)
    if args.top_k < 1 or args.batch_size < 1 or (args.partitions or 1) < 1:
        ap.error("--top-k, --batch-size and --partitions must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    folders = []
    for f in args.folders:  # a missing folder is one line; the others are scored
        if Path(f).exists():
            folders.append(str(Path(f).resolve()))
        else:
            print(f"error: {f}: no such file or folder; skipped", file=sys.stderr)
    if not folders:
        return 2
    if args.engine == "spark" and (why := spark_missing(args.env_manager)):
        print(f"error: {why}", file=sys.stderr)
        return 2
    uri = args.model or default_model(args.registered_model)
    if uri is None:
        return 2
    start = time.perf_counter()
    try:
        n, failed = (run_spark if args.engine == "spark" else run_local)(args, uri, folders)
    except Refused as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    took = time.perf_counter() - start
    what = "photos scored" if args.group_by == "none" else "answers (folders, and photos that failed)"
    print(f"{n} {what} in {took:.1f} s ({n / took if took else 0:.1f}/s) -> {args.output}"
          + (f"; {failed} failed (their error rows)" if failed else ""), file=sys.stderr)
    return 1 if failed else 0 if n else 2


if __name__ == "__main__":
    sys.exit(main())
