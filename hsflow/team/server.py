"""`python -m hsflow.server start|stop|status|add-user` (`make server`, `make server-stop`): a team's tracking server.

PostgreSQL (Debian's `postgresql` package) holds the runs, the registry and the sign-in users; `mlflow server
--app-name basic-auth` serves them with MLflow's built-in authentication and serves the artifacts from a folder.
Everything lives in one data folder (default `data/server/`, git-ignored), created on the first start and kept
across restarts:

    pg/            the PostgreSQL cluster (owned by the `postgres` user when started as root: PostgreSQL refuses root)
    artifacts/     what runs log (models, plots), served by the server (mlflow-artifacts:/)
    secret/        0600 files: admin_password (MLflow's `admin` user), pg_password, flask_secret
    auth.ini       MLflow basic-auth's config (its user store on the same PostgreSQL, database mlflow_auth)
    server.json    what runs now: URL, ports, the mlflow server's process id; mlflow.log beside it

The server listens on 127.0.0.1 unless --host says otherwise; PostgreSQL always listens on 127.0.0.1 only (the
mlflow server is its one client). No password is ever in the repo: they are generated on the first start (or the
admin's taken from $MLFLOW_AUTH_ADMIN_PASSWORD), and clients sign in with MLflow's own variables
(MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD) or ~/.mlflow/credentials. docs/team.md has the whole setup.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from hsflow.core.config import ROOT_DIR

DEFAULT_DIR = ROOT_DIR / "data" / "server"
DEFAULT_PORT, DEFAULT_PG_PORT = 5000, 5433   # 5432 left to a system PostgreSQL
PG_USER, DATABASES = "mlflow", ("mlflow", "mlflow_auth")
ADMIN = "admin"
# Read for every signed-in user, writes only by grant (and by whoever created the experiment or model).
DEFAULT_PERMISSION = os.environ.get("HSFLOW_SERVER_DEFAULT_PERMISSION", "READ")


class ServerError(RuntimeError):
    """Something the person starting the server must fix; the message is one line saying what to do."""


@dataclass
class Layout:
    """The data folder's parts."""
    root: Path

    @property
    def pg(self) -> Path:
        return self.root / "pg"

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    @property
    def secret(self) -> Path:
        return self.root / "secret"

    @property
    def state(self) -> Path:
        return self.root / "server.json"

    def read_secret(self, name: str) -> str:
        return (self.secret / name).read_text().strip()


# --- PostgreSQL -----------------------------------------------------------------------------------------------------

def pg_bin(tool: str) -> str:
    """A PostgreSQL server program (initdb, pg_ctl): $HSFLOW_PG_BIN, Debian's /usr/lib/postgresql/<v>/bin, PATH."""
    if os.environ.get("HSFLOW_PG_BIN"):  # when set, the only place looked at
        dirs = [os.environ["HSFLOW_PG_BIN"]]
    else:
        dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(Path(d).parent.name), reverse=True)
        dirs += os.environ.get("PATH", "").split(os.pathsep)
    for d in dirs:
        if d and os.access(os.path.join(d, tool), os.X_OK):
            return os.path.join(d, tool)
    raise ServerError(f"PostgreSQL is not installed (no {tool} in /usr/lib/postgresql/*/bin or on PATH): install it "
                      "with `apt-get install -y postgresql` (Debian/Ubuntu) or set HSFLOW_PG_BIN to its bin folder")


def as_pg_user(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run its programs as the `postgres` user the package made."""
    if os.geteuid() != 0:
        return cmd
    runuser = shutil.which("runuser", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))
    return [runuser or "runuser", "-u", "postgres", "--", *cmd]


def _hand_to_pg_user(path: Path) -> None:
    if os.geteuid() != 0:
        return
    import pwd

    try:
        pw = pwd.getpwnam("postgres")
    except KeyError:
        raise ServerError("running as root, but there is no `postgres` user to run PostgreSQL as: install Debian's "
                          "`postgresql` package (it makes one), or start the server as an ordinary user") from None
    for parent in path.resolve().parents:  # the postgres user must be able to walk down to its folder
        if not parent.stat().st_mode & 0o001:
            raise ServerError(f"the postgres user cannot enter {parent} (mode {oct(parent.stat().st_mode)[-3:]}): "
                              "choose a data folder it can reach (--data DIR), or `chmod o+x` that folder")
    os.chown(path, pw.pw_uid, pw.pw_gid)


def init_cluster(lay: Layout) -> bool:
    """initdb on first start (superuser `mlflow`, password auth only); False when the cluster already exists."""
    if (lay.pg / "PG_VERSION").exists():
        return False
    lay.pg.mkdir(parents=True, exist_ok=True)
    os.chmod(lay.pg, 0o700)
    _hand_to_pg_user(lay.pg)
    import tempfile

    fd, name = tempfile.mkstemp(prefix="hsflow-pg-")  # 0600, gone after initdb (the cluster folder must be empty)
    pwfile = Path(name)
    with os.fdopen(fd, "w") as fh:
        fh.write(lay.read_secret("pg_password") + "\n")
    _hand_to_pg_user(pwfile)
    try:
        proc = subprocess.run(as_pg_user([pg_bin("initdb"), "-D", str(lay.pg), "-U", PG_USER, f"--pwfile={pwfile}",
                                          "--auth=scram-sha-256", "-E", "UTF8", "--no-instructions"]),
                              capture_output=True, text=True)
    finally:
        pwfile.unlink(missing_ok=True)
    if proc.returncode != 0:
        raise ServerError(f"initdb failed in {lay.pg}: {_last_line(proc.stderr or proc.stdout)}")
    return True


def pg_running(lay: Layout) -> bool:
    proc = subprocess.run(as_pg_user([pg_bin("pg_ctl"), "-D", str(lay.pg), "status"]), capture_output=True)
    return proc.returncode == 0


def start_postgres(lay: Layout, port: int) -> None:
    """pg_ctl start on 127.0.0.1:port, TCP only (no Unix socket), waiting until it accepts connections."""
    if pg_running(lay):
        return
    ensure_free("127.0.0.1", port, "PostgreSQL", "--pg-port")
    log = lay.pg / "postgres.log"
    proc = subprocess.run(as_pg_user([pg_bin("pg_ctl"), "-D", str(lay.pg), "-l", str(log), "-w", "-t", "60", "-o",
                                      f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories=''",
                                      "start"]), capture_output=True, text=True)
    if proc.returncode != 0:
        tail = log.read_text().strip().splitlines()[-1:] if log.exists() else []
        raise ServerError(f"PostgreSQL did not start on 127.0.0.1:{port}: {(tail or [_last_line(proc.stderr)])[0]} "
                          f"(log: {log})")


def stop_postgres(lay: Layout, mode: str = "fast") -> bool:
    if not (lay.pg / "PG_VERSION").exists() or not pg_running(lay):
        return False
    subprocess.run(as_pg_user([pg_bin("pg_ctl"), "-D", str(lay.pg), "-m", mode, "-w", "stop"]),
                   capture_output=True, check=True)
    return True


def restart_postgres(data: Path) -> None:
    """PostgreSQL stopped and started under a running mlflow server (what an OS update or a crash recovery does)."""
    lay = Layout(Path(data).resolve())
    stop_postgres(lay)
    start_postgres(lay, read_state(lay)["pg_port"])


def restart_mlflow(data: Path) -> dict:
    """The mlflow server alone stopped and started again on the same address (PostgreSQL keeps running)."""
    lay = Layout(Path(data).resolve())
    state = read_state(lay)
    stop_mlflow(state["pid"])
    state["pid"] = start_mlflow(lay, state["host"], state["port"], state["pg_port"], state["workers"])
    lay.state.write_text(json.dumps(state, indent=1))
    return state


def ensure_databases(lay: Layout, port: int) -> None:
    """The tracking and the sign-in databases, created on first start; a refused password is one line."""
    import psycopg

    try:
        with psycopg.connect(host="127.0.0.1", port=port, user=PG_USER, dbname="postgres", connect_timeout=10,
                             password=lay.read_secret("pg_password"), autocommit=True) as conn:
            have = {r[0] for r in conn.execute("SELECT datname FROM pg_database")}
            for db in DATABASES:
                if db not in have:
                    conn.execute(f'CREATE DATABASE "{db}"')
    except psycopg.OperationalError as exc:
        if "password" in str(exc):
            raise ServerError(f"PostgreSQL on 127.0.0.1:{port} refused the password in {lay.secret / 'pg_password'} "
                              "(changed since the cluster was made?): put the cluster's password back in that file, "
                              f"or move {lay.root} away to start an empty server") from None
        raise ServerError(f"cannot reach PostgreSQL on 127.0.0.1:{port}: {_last_line(str(exc))}") from None


# --- the mlflow server ----------------------------------------------------------------------------------------------

def ensure_secrets(lay: Layout) -> None:
    """0600 files made once: the admin's password ($MLFLOW_AUTH_ADMIN_PASSWORD when set), PostgreSQL's, Flask's key."""
    lay.secret.mkdir(parents=True, exist_ok=True)
    os.chmod(lay.secret, 0o700)
    for name, make in (("admin_password", lambda: os.environ.get("MLFLOW_AUTH_ADMIN_PASSWORD")
                        or secrets.token_urlsafe(18)), ("pg_password", lambda: secrets.token_urlsafe(24)),
                       ("flask_secret", lambda: secrets.token_hex(32))):
        path = lay.secret / name
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(make() + "\n")


def write_auth_config(lay: Layout, pg_port: int) -> Path:
    """MLflow basic-auth's config: its user store on the same PostgreSQL (the password comes from PGPASSWORD)."""
    ini = lay.root / "auth.ini"
    ini.write_text(
        "[mlflow]\n"
        f"default_permission = {DEFAULT_PERMISSION}\n"
        f"database_uri = postgresql+psycopg://{PG_USER}@127.0.0.1:{pg_port}/mlflow_auth\n"
        f"admin_username = {ADMIN}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        "grant_default_workspace_access = false\n"
        # A signed-in client's password is checked (PBKDF2) once per 30 s per worker, not on every request.
        "auth_cache_ttl_seconds = 30\n")
    os.chmod(ini, 0o600)
    return ini


def server_env(lay: Layout, ini: Path) -> dict[str, str]:
    return {**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(ini), "PGPASSWORD": lay.read_secret("pg_password"),
            "MLFLOW_AUTH_ADMIN_PASSWORD": lay.read_secret("admin_password"),
            "MLFLOW_FLASK_SERVER_SECRET_KEY": lay.read_secret("flask_secret"), "MLFLOW_DISABLE_TELEMETRY": "true",
            # MLflow's job runner serves GenAI features (online trace scoring, trace archival) hsflow has none of:
            # off, it spares 8 processes that each import MLflow (a minute of CPU at start on 2 cores).
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": os.environ.get("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false"),
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}


def start_mlflow(lay: Layout, host: str, port: int, pg_port: int, workers: int, timeout: float = 180) -> int:
    """`mlflow server --app-name basic-auth` on PostgreSQL, in its own process group; returns its process id once
    /health answers."""
    ensure_free(host, port, "the mlflow server", "--port")
    ini = write_auth_config(lay, pg_port)
    lay.artifacts.mkdir(parents=True, exist_ok=True)
    mlflow = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"
    cmd = [mlflow, "server", "--app-name", "basic-auth",
           "--backend-store-uri", f"postgresql+psycopg://{PG_USER}@127.0.0.1:{pg_port}/mlflow",
           "--artifacts-destination", str(lay.artifacts.resolve()), "--host", host, "--port", str(port),
           "--workers", str(workers)]
    with open(lay.root / "mlflow.log", "a") as log:
        proc = subprocess.Popen(cmd, env=server_env(lay, ini), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    url = f"http://{_client_host(host)}:{port}"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise ServerError(f"mlflow server exited at start: {_log_error(lay.root / 'mlflow.log')} "
                              f"(log: {lay.root / 'mlflow.log'})")
        if healthy(url):
            return proc.pid
        time.sleep(0.5)
    _kill_group(proc.pid)
    raise ServerError(f"mlflow server did not answer {url}/health in {timeout:.0f} s (log: {lay.root / 'mlflow.log'})")


def stop_mlflow(pid: int) -> bool:
    return _kill_group(pid)


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=3) as resp:
            return resp.status == 200
    except OSError:
        return False


# --- the commands -----------------------------------------------------------------------------------------------------

def start(data: Path = DEFAULT_DIR, host: str = "127.0.0.1", port: int = DEFAULT_PORT, pg_port: int = DEFAULT_PG_PORT,
          workers: int = 2) -> dict:
    """PostgreSQL then the mlflow server; returns the state (url, ports, pid). An already running one is reused."""
    lay = Layout(Path(data).resolve())
    pg_bin("pg_ctl")  # a missing install is the first thing said
    state = read_state(lay)
    if state and _alive(state["pid"]) and healthy(state["url"]):
        return {**state, "already": True}
    ensure_free(host, port, "the mlflow server", "--port")  # both ports checked before anything is made or started
    if not ((lay.pg / "PG_VERSION").exists() and pg_running(lay)):
        ensure_free("127.0.0.1", pg_port, "PostgreSQL", "--pg-port")
    lay.root.mkdir(parents=True, exist_ok=True)
    ensure_secrets(lay)
    created = init_cluster(lay)
    start_postgres(lay, pg_port)
    ensure_databases(lay, pg_port)
    pid = start_mlflow(lay, host, port, pg_port, workers)
    state = {"url": f"http://{_client_host(host)}:{port}", "host": host, "port": port, "pg_port": pg_port,
             "workers": workers, "pid": pid, "data": str(lay.root), "created": created}
    lay.state.write_text(json.dumps(state, indent=1))
    return state


def stop(data: Path = DEFAULT_DIR) -> list[str]:
    """The mlflow server, then PostgreSQL; returns what was stopped."""
    lay = Layout(Path(data).resolve())
    state, done = read_state(lay), []
    if state and stop_mlflow(state["pid"]):
        done.append(f"mlflow server (pid {state['pid']}, {state['url']})")
    if (lay.pg / "PG_VERSION").exists() and stop_postgres(lay):
        done.append(f"PostgreSQL ({lay.pg})")
    lay.state.unlink(missing_ok=True)
    return done


def backup(data: Path, dest: Path) -> dict:
    """pg_dump (custom format) of both databases and a tar of the artifacts into dest/<UTC time>/, while the server
    runs (pg_dump reads one consistent snapshot); returns {file: bytes} and the seconds it took."""
    import datetime as dt
    import tarfile

    lay = Layout(Path(data).resolve())
    state = read_state(lay)
    if not state or not pg_running(lay):
        raise ServerError(f"no server running from {lay.root}: `make server` first (pg_dump reads the running one)")
    out = Path(dest).resolve() / dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out.mkdir(parents=True)
    t0 = time.perf_counter()
    env = {**os.environ, "PGPASSWORD": lay.read_secret("pg_password")}
    for db in DATABASES:
        proc = subprocess.run([pg_bin("pg_dump"), "-h", "127.0.0.1", "-p", str(state["pg_port"]), "-U", PG_USER,
                               "-Fc", "-f", str(out / f"{db}.dump"), db], env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise ServerError(f"pg_dump of {db} failed: {_last_line(proc.stderr)}")
    with tarfile.open(out / "artifacts.tar.gz", "w:gz") as tar:
        tar.add(lay.artifacts, arcname="artifacts")
    return {"folder": str(out), "seconds": round(time.perf_counter() - t0, 1),
            "files": {p.name: p.stat().st_size for p in sorted(out.iterdir())}}


def client_line(state: dict, user: str = ADMIN) -> str:
    """The one line that points training (and every other door) at the server."""
    secret = Path(state["data"]) / "secret" / "admin_password"
    return (f"export MLFLOW_TRACKING_URI={state['url']} MLFLOW_TRACKING_USERNAME={user} "
            f"MLFLOW_TRACKING_PASSWORD=\"$(cat {secret})\"")


def add_user(url: str, name: str, password: str, admin: bool = False) -> None:
    """An account on the server, made by the admin (credentials from MLFLOW_TRACKING_USERNAME/PASSWORD)."""
    import warnings

    with warnings.catch_warnings():  # importing MLflow's server app warns about Starlette; nothing for this user
        warnings.simplefilter("ignore")
        from mlflow.server import get_app_client

        auth = get_app_client("basic-auth", tracking_uri=url)
        auth.create_user(name, password)
        if admin:
            auth.update_user_admin(name, True)


def read_state(lay: Layout) -> dict | None:
    try:
        return json.loads(lay.state.read_text())
    except (OSError, ValueError):
        return None


def ensure_free(host: str, port: int, what: str, option: str) -> None:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind: only a listener is in the way
        try:
            s.bind((host, port))
        except OSError:
            raise ServerError(f"port {port} on {host} is in use (another server, or `make ui`?), so {what} cannot "
                              f"listen there: stop what uses it, or choose another port with {option} N "
                              f"(make server ARGS=\"{option} N\")") from None


def _client_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "") else host


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def _kill_group(pid: int, timeout: float = 30) -> bool:
    """SIGTERM to the server's process group (its uvicorn workers, job runner and huey consumers), SIGKILL to
    whatever of it is left after `timeout` or once the server itself has gone."""
    if not _alive(pid):
        return False
    try:
        os.killpg(pid, signal.SIGTERM)
    except OSError:
        return False
    deadline = time.time() + timeout
    while time.time() < deadline and _group_alive(pid):
        with contextlib.suppress(ChildProcessError):  # reap it when it is our child (else it lingers as a zombie)
            os.waitpid(pid, os.WNOHANG)
        if not _alive(pid):  # the server has gone: what is left of its group gets 5 s more
            deadline = min(deadline, time.time() + 5)
        time.sleep(0.2)
    with contextlib.suppress(OSError):
        os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
    return True


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except OSError:
        return False


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in (text or "").strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "(no output)"


def _log_error(log: Path) -> str:
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()] if log.exists() else []
    errors = [ln for ln in lines if "Error" in ln or "error" in ln]
    return (errors or lines or ["(no output)"])[-1].strip()[:400]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hsflow.server", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("start", "stop", "status"):
        p = sub.add_parser(name)
        p.add_argument("--data", type=Path, default=DEFAULT_DIR, help=f"the data folder (default {DEFAULT_DIR})")
        if name == "start":
            p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
            p.add_argument("--port", type=int, default=DEFAULT_PORT)
            p.add_argument("--pg-port", type=int, default=DEFAULT_PG_PORT, help="PostgreSQL's (on 127.0.0.1)")
            p.add_argument("--workers", type=int, default=2, help="mlflow server processes")
    p = sub.add_parser("backup", help="pg_dump of both databases and a tar of the artifacts, while it runs")
    p.add_argument("dest", type=Path, help="folder that receives <UTC time>/{mlflow,mlflow_auth}.dump, artifacts.tar.gz")
    p.add_argument("--data", type=Path, default=DEFAULT_DIR)
    p = sub.add_parser("add-user", help="an account on the server (run with the admin's credentials)")
    p.add_argument("name")
    p.add_argument("--admin", action="store_true")
    args = ap.parse_args(argv)
    try:
        return COMMANDS[args.cmd](args)
    except ServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _cmd_start(args) -> int:
    state = start(args.data, args.host, args.port, args.pg_port, args.workers)
    how = "already running" if state.get("already") else ("started (new database)" if state.get("created")
                                                          else "started")
    print(f"mlflow server {how} on {state['url']} (PostgreSQL on 127.0.0.1:{state['pg_port']}, data in "
          f"{state['data']}; `make server-stop` stops both)")
    print("point training, sweeps, refresh and the doors at it (as the admin; `python -m hsflow.server add-user NAME` "
          "makes accounts):")
    print(client_line(state))
    return 0


def _cmd_stop(args) -> int:
    done = stop(args.data)
    print("stopped " + " and ".join(done) if done else f"no server was running from {Path(args.data).resolve()}")
    return 0


def _cmd_status(args) -> int:
    state = read_state(Layout(Path(args.data).resolve()))
    if not state or not healthy(state["url"]):
        print(f"no server running from {Path(args.data).resolve()}: `make server` starts one")
        return 1
    print(f"mlflow server on {state['url']} (pid {state['pid']}), PostgreSQL on 127.0.0.1:{state['pg_port']}")
    return 0


def _cmd_add_user(args) -> int:
    import getpass

    from mlflow.exceptions import MlflowException

    url = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not url.startswith("http"):
        raise ServerError("set MLFLOW_TRACKING_URI (and the admin's MLFLOW_TRACKING_USERNAME/PASSWORD) to the server "
                          "first: `make server` prints the line")
    try:
        password = os.environ.get("HSFLOW_NEW_USER_PASSWORD") or getpass.getpass(f"password for {args.name}: ")
    except EOFError:
        raise ServerError("no password given: type it at the prompt, or set HSFLOW_NEW_USER_PASSWORD") from None
    try:
        add_user(url, args.name, password, args.admin)
    except MlflowException as exc:
        why = exc.message.strip().splitlines()[0][:300]
        if "duplicate key" in why or "UNIQUE" in why or "already exists" in why:
            why = "that user exists already"
        elif "403" in why or "401" in why:
            why = ("only an admin may create users: sign in as one (MLFLOW_TRACKING_USERNAME/PASSWORD; `make server` "
                   "prints the admin's line)")
        raise ServerError(f"{url} refused to create user {args.name!r}: {why}") from None
    print(f"user {args.name!r} created on {url}{' (admin)' if args.admin else ''}; they sign in with "
          f"MLFLOW_TRACKING_USERNAME={args.name} MLFLOW_TRACKING_PASSWORD=... or ~/.mlflow/credentials")
    return 0


def _cmd_backup(args) -> int:
    done = backup(args.data, args.dest)
    print(f"backup in {done['folder']} ({done['seconds']} s): " + ", ".join(f"{k} {v / 1e6:.1f} MB"
                                                                       for k, v in done["files"].items()))
    return 0


COMMANDS = {"backup": _cmd_backup, "start": _cmd_start, "stop": _cmd_stop, "status": _cmd_status, "add-user": _cmd_add_user}

if __name__ == "__main__":
    sys.exit(main())
