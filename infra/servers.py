"""The team's MLflow and Prefect servers on one machine, without containers, both on PostgreSQL.

The same servers as ``infra/docker-compose.yml``, for a machine with a PostgreSQL server and no
Docker engine (artifacts go to a local folder instead of MinIO, still proxied by MLflow)::

    .venv/bin/python infra/servers.py start    # creates the databases if missing, starts both, waits for health
    .venv/bin/python infra/servers.py status   # pid, health and URL of each
    .venv/bin/python infra/servers.py env      # the exports that point the pipeline at them
    .venv/bin/python infra/servers.py stop

(``make servers``, ``make servers-status``, ``make servers-stop``.) Pid files, logs, Prefect's home
and the MLflow artifacts live in the state folder (``infra/state/`` by default, git-ignored).
Every setting has a flag and an environment variable (``SKINRISK_PG_URL``, ``SKINRISK_MLFLOW_PORT``
...; ``--help`` lists them).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlsplit

import requests

DEFAULT_STATE = Path(__file__).resolve().parent / "state"
SERVERS = ("mlflow", "prefect")


class ServerError(RuntimeError):
    """A server or its database could not be started, reached or stopped; the message says why."""


@dataclass(frozen=True)
class ServerConfig:
    """Where the databases are, which ports the servers listen on, and where their state goes."""

    postgres_url: str = "postgresql://postgres@127.0.0.1:5432"  # no database: one is appended per server
    mlflow_db: str = "skinrisk_mlflow"
    prefect_db: str = "skinrisk_prefect"
    host: str = "127.0.0.1"
    mlflow_port: int = 5000
    prefect_port: int = 4200
    state_dir: Path = DEFAULT_STATE
    mlflow_workers: int = 2  # MLflow's default (4) is too many for a 2-core machine
    prefect_ui: bool = True
    startup_timeout: float = 240.0
    mlflow_backend_store: str = ""  # overrides the PostgreSQL database (e.g. sqlite:///... in tests)
    extra_env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> ServerConfig:
        env = os.environ if environ is None else environ
        defaults = cls()
        return cls(
            postgres_url=env.get("SKINRISK_PG_URL", defaults.postgres_url).rstrip("/"),
            mlflow_db=env.get("SKINRISK_MLFLOW_DB", defaults.mlflow_db),
            prefect_db=env.get("SKINRISK_PREFECT_DB", defaults.prefect_db),
            host=env.get("SKINRISK_SERVERS_HOST", defaults.host),
            mlflow_port=int(env.get("SKINRISK_MLFLOW_PORT", defaults.mlflow_port)),
            prefect_port=int(env.get("SKINRISK_PREFECT_PORT", defaults.prefect_port)),
            state_dir=Path(env.get("SKINRISK_SERVERS_DIR", defaults.state_dir)),
        )

    @property
    def mlflow_backend_uri(self) -> str:
        return self.mlflow_backend_store or f"{self.postgres_url}/{self.mlflow_db}"

    @property
    def prefect_database_url(self) -> str:
        scheme, rest = self.postgres_url.split("://", 1)
        return f"{scheme.split('+')[0]}+asyncpg://{rest}/{self.prefect_db}"

    @property
    def artifacts_dir(self) -> Path:
        return Path(self.state_dir).resolve() / "mlartifacts"

    @property
    def mlflow_uri(self) -> str:
        return f"http://{self.host}:{self.mlflow_port}"

    @property
    def prefect_api_url(self) -> str:
        return f"http://{self.host}:{self.prefect_port}/api"

    def health_url(self, server: str) -> str:
        return f"{self.mlflow_uri}/health" if server == "mlflow" else f"{self.prefect_api_url}/health"

    def pid_file(self, server: str) -> Path:
        return Path(self.state_dir) / f"{server}.pid"

    def log_file(self, server: str) -> Path:
        return Path(self.state_dir) / f"{server}.log"


# --- databases --------------------------------------------------------------------------------


def _admin_connection(postgres_url: str):
    import psycopg

    try:
        # autocommit: CREATE/DROP DATABASE cannot run in a transaction
        connection = psycopg.connect(f"{postgres_url}/postgres", connect_timeout=5, autocommit=True)
    except psycopg.OperationalError as exc:
        where = urlsplit(postgres_url).netloc or postgres_url
        raise ServerError(
            f"PostgreSQL at {where} is not reachable ({str(exc).strip()}): start it, or point "
            "SKINRISK_PG_URL (--pg) at one, e.g. postgresql://USER:PASSWORD@HOST:5432"
        ) from exc
    return connection


def ensure_database(postgres_url: str, name: str) -> bool:
    """Create database ``name`` if it does not exist; returns whether it was created."""
    from psycopg import sql

    connection = _admin_connection(postgres_url)
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if cursor.fetchone():
                return False
            cursor.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            return True
    finally:
        connection.close()


def drop_database(postgres_url: str, name: str) -> None:
    """Drop database ``name`` if it exists, closing its connections (PostgreSQL 13+)."""
    from psycopg import sql

    connection = _admin_connection(postgres_url)
    try:
        with connection.cursor() as cursor:
            cursor.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
    finally:
        connection.close()


# --- processes --------------------------------------------------------------------------------


def _command(server: str, config: ServerConfig) -> list[str]:
    if server == "mlflow":
        return [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            config.mlflow_backend_uri,
            "--artifacts-destination",
            str(config.artifacts_dir),  # proxied: clients upload through the server, need no storage creds
            "--serve-artifacts",
            "--host",
            config.host,
            "--port",
            str(config.mlflow_port),
            "--workers",
            str(config.mlflow_workers),
        ]
    return [
        sys.executable,
        "-m",
        "prefect",
        "server",
        "start",
        "--host",
        config.host,
        "--port",
        str(config.prefect_port),
    ]


def _environment(server: str, config: ServerConfig) -> dict[str, str]:
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "DO_NOT_TRACK": "1",
        **config.extra_env,
    }
    if server == "prefect":
        env.pop("PREFECT_API_URL", None)  # the server is the API; a client setting must not leak in
        env.update(
            PREFECT_HOME=str(Path(config.state_dir).resolve() / "prefect-home"),
            PREFECT_API_DATABASE_CONNECTION_URL=config.prefect_database_url,
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_UI_ENABLED=str(config.prefect_ui).lower(),
        )
    return env


def _process_is(server: str, pid: int) -> bool:
    """Whether ``pid`` is alive and is still the server we started (pids are reused)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        try:
            os.kill(pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True  # no /proc (macOS): trust the pid file
    return server.encode() in cmdline


def _read_pid(server: str, config: ServerConfig) -> int | None:
    try:
        pid = int(config.pid_file(server).read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _process_is(server, pid) else None


def healthy(server: str, config: ServerConfig, timeout: float = 2.0) -> bool:
    try:
        return requests.get(config.health_url(server), timeout=timeout).status_code == 200
    except requests.RequestException:
        return False


def _log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _spawn(server: str, config: ServerConfig) -> subprocess.Popen:
    Path(config.state_dir).mkdir(parents=True, exist_ok=True)
    if server == "mlflow":
        config.artifacts_dir.mkdir(parents=True, exist_ok=True)
    with open(config.log_file(server), "ab") as log:
        process = subprocess.Popen(
            _command(server, config),
            env=_environment(server, config),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop_server() ends the server and its workers
        )
    config.pid_file(server).write_text(f"{process.pid}\n")
    return process


def _wait_healthy(config: ServerConfig, launched: dict[str, tuple[subprocess.Popen, float]]) -> dict[str, float]:
    """Poll the launched servers side by side; the seconds each took from launch to healthy."""
    seconds: dict[str, float] = {}
    while len(seconds) < len(launched):
        for server, (process, started) in launched.items():
            if server in seconds:
                continue
            if process.poll() is not None:
                config.pid_file(server).unlink(missing_ok=True)
                raise ServerError(
                    f"the {server} server exited with code {process.returncode} while starting; "
                    f"{config.log_file(server)} ends with:\n{_log_tail(config.log_file(server))}"
                )
            if healthy(server, config):
                seconds[server] = time.monotonic() - started
            elif time.monotonic() > started + config.startup_timeout:
                raise ServerError(
                    f"the {server} server did not answer {config.health_url(server)} within "
                    f"{config.startup_timeout:.0f} s; {config.log_file(server)} ends with:\n"
                    f"{_log_tail(config.log_file(server))}"
                )
        time.sleep(0.5)
    return seconds


def start_servers(config: ServerConfig, servers: tuple[str, ...] = SERVERS) -> dict[str, float]:
    """Start the servers in the background, side by side, and wait for their health endpoints.

    Returns the seconds each took from launch to healthy (0 for one that was already running).
    If one fails, those started here are stopped again.
    """
    seconds: dict[str, float] = {}
    launched: dict[str, tuple[subprocess.Popen, float]] = {}
    for server in servers:
        if _read_pid(server, config) and healthy(server, config):
            seconds[server] = 0.0
            continue
        if healthy(server, config):
            raise ServerError(
                f"something else already answers on {config.health_url(server)}: stop it or choose another port"
            )
        launched[server] = (_spawn(server, config), time.monotonic())
    try:
        seconds.update(_wait_healthy(config, launched))
    except BaseException:  # a failure, or Ctrl-C while waiting: leave nothing half-started behind
        for server in launched:
            stop_server(server, config)
        raise
    return {server: seconds[server] for server in servers}


def stop_server(server: str, config: ServerConfig, timeout: float = 30.0) -> bool:
    """Stop one server (its whole process group); returns whether one was running."""
    pid = _read_pid(server, config)
    config.pid_file(server).unlink(missing_ok=True)
    if pid is None:
        return False
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return True
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                return True
            _reap(pid)
            time.sleep(0.2)
    return True


def _reap(pid: int) -> None:
    """Collect the exit status when the server is our own child (so it leaves no zombie)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def start(config: ServerConfig, say: Callable[[str], None] = print) -> dict[str, float]:
    """Create the databases if missing, start both servers; returns the seconds each took to start."""
    for name in (config.mlflow_db, config.prefect_db):
        if ensure_database(config.postgres_url, name):
            say(f"created database {name}")
    seconds = start_servers(config)
    for server, took in seconds.items():
        state = "already running" if took == 0 else f"started in {took:.1f} s"
        say(f"{server}: {state} on {config.health_url(server).rsplit('/', 1)[0]} (log {config.log_file(server)})")
    return seconds


def stop(config: ServerConfig, say: Callable[[str], None] = print) -> None:
    for server in reversed(SERVERS):
        say(f"{server}: {'stopped' if stop_server(server, config) else 'not running'}")


def status(config: ServerConfig) -> dict[str, dict]:
    return {
        server: {
            "pid": _read_pid(server, config),
            "healthy": healthy(server, config),
            "url": config.health_url(server).rsplit("/", 1)[0],
            "log": str(config.log_file(server)),
        }
        for server in SERVERS
    }


def env_exports(config: ServerConfig) -> str:
    return f"export MLFLOW_TRACKING_URI={config.mlflow_uri}\nexport PREFECT_API_URL={config.prefect_api_url}"


def main(argv: list[str] | None = None) -> int:
    defaults = ServerConfig.from_env()
    parser = argparse.ArgumentParser(
        prog="infra/servers.py", description="MLflow and Prefect servers on PostgreSQL, without containers."
    )
    parser.add_argument("command", choices=["start", "stop", "status", "env"])
    parser.add_argument("--pg", default=defaults.postgres_url, help="PostgreSQL URL without database [SKINRISK_PG_URL]")
    parser.add_argument("--mlflow-db", default=defaults.mlflow_db, help="[SKINRISK_MLFLOW_DB]")
    parser.add_argument("--prefect-db", default=defaults.prefect_db, help="[SKINRISK_PREFECT_DB]")
    parser.add_argument("--host", default=defaults.host, help="interface to bind [SKINRISK_SERVERS_HOST]")
    parser.add_argument("--mlflow-port", type=int, default=defaults.mlflow_port, help="[SKINRISK_MLFLOW_PORT]")
    parser.add_argument("--prefect-port", type=int, default=defaults.prefect_port, help="[SKINRISK_PREFECT_PORT]")
    parser.add_argument(
        "--state-dir", type=Path, default=defaults.state_dir, help="pids, logs, artifacts [SKINRISK_SERVERS_DIR]"
    )
    args = parser.parse_args(argv)
    config = replace(
        defaults,
        postgres_url=args.pg.rstrip("/"),
        mlflow_db=args.mlflow_db,
        prefect_db=args.prefect_db,
        host=args.host,
        mlflow_port=args.mlflow_port,
        prefect_port=args.prefect_port,
        state_dir=args.state_dir,
    )
    try:
        if args.command == "start":
            start(config)
            print("\n# point the pipeline at them:\n" + env_exports(config))
        elif args.command == "stop":
            stop(config)
        elif args.command == "status":
            running = True
            for server, info in status(config).items():
                running &= info["healthy"]
                state = "healthy" if info["healthy"] else "not answering"
                print(f"{server:8} pid {info['pid'] or '-':>7}  {state:14} {info['url']}  log {info['log']}")
            return 0 if running else 3
        else:
            print(env_exports(config))
    except ServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
