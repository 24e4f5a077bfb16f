"""What the team servers cost: their start time, and the training + promotion flows run against them
(MLflow and Prefect servers on PostgreSQL, infra/servers.py) against the embedded default
(Prefect's ephemeral API, MLflow on a SQLite file), on the same tiny synthetic pipeline.

    .venv/bin/python benchmarks/server_overhead.py [--pg postgresql://postgres@127.0.0.1:5432] [--repeats 1]

Needs a PostgreSQL server (trust or a URL with credentials); creates uniquely named databases and
drops them at the end. Each flow run is a fresh process (as a worker runs it), in a fresh folder.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from infra import servers  # noqa: E402
from tests.support import tiny_params_file  # noqa: E402

RUN_FLOWS = """
import json, sys, time
started = time.perf_counter()
from flows.promotion import promotion_flow
from flows.training import training_pipeline
imported = time.perf_counter()
args = json.loads(sys.argv[1])
training_pipeline(**args["training"])
trained = time.perf_counter()
promotion_flow(**args["promotion"])
print("RESULT " + json.dumps({
    "import_s": imported - started, "training_s": trained - imported, "promotion_s": time.perf_counter() - trained,
}))
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_flows(work: Path, params: Path, env: dict[str, str], prefect_home: Path) -> dict[str, float]:
    """The training then the promotion flow in a fresh process; seconds per phase and in all."""
    work.mkdir(parents=True)
    dirs = {
        "raw_dir": str(work / "data" / "raw"),
        "processed_dir": str(work / "data" / "processed"),
        "reports_dir": str(work / "reports"),
        "synthetic_dir": str(work / "data" / "synthetic"),
    }
    args = {
        "training": {"params_file": str(params), "model_dir": str(work / "models"), **dirs},
        "promotion": {"params_file": str(params), "processed_dir": dirs["processed_dir"], "raw_dir": dirs["raw_dir"]},
    }
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "PREFECT_HOME": str(prefect_home),
        "SKINRISK_LOCK_DIR": str(work / "locks"),
        "TF_CPP_MIN_LOG_LEVEL": "2",
        **env,
    }
    env = {key: value for key, value in env.items() if value}  # PREFECT_API_URL="": the ephemeral API
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", RUN_FLOWS, json.dumps(args)], cwd=work, env=env, capture_output=True, text=True
    )
    total = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"the flows failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
    figures = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
    return {**figures, "total_s": total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pg", default=os.environ.get("SKINRISK_PG_URL", "postgresql://postgres@127.0.0.1:5432"))
    parser.add_argument("--repeats", type=int, default=1, help="flow runs per mode")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="skinrisk-server-overhead-"))
    params = tiny_params_file(scratch / "params.yaml")
    values = yaml.safe_load(params.read_text())
    values["promote"].update(min_balanced_accuracy=0.0, min_high_risk_recall=0.0, max_ece=1.0)
    params.write_text(yaml.safe_dump(values, sort_keys=False))

    suffix = uuid.uuid4().hex[:8]
    config = servers.ServerConfig(
        postgres_url=args.pg.rstrip("/"),
        mlflow_db=f"skinrisk_mlflow_b{suffix}",
        prefect_db=f"skinrisk_prefect_b{suffix}",
        mlflow_port=_free_port(),
        prefect_port=_free_port(),
        state_dir=scratch / "servers",
        prefect_ui=False,
        startup_timeout=600,
    )
    results: dict[str, list[dict[str, float]]] = {"embedded": [], "servers": []}
    try:
        cold = servers.start(config, say=lambda line: None)  # new databases: migrations included
        for server in servers.SERVERS:
            servers.stop_server(server, config)
        warm = servers.start_servers(config)  # the databases exist: a restart
        modes = {
            "embedded": lambda repeat: {
                "MLFLOW_TRACKING_URI": f"sqlite:///{scratch / f'embedded-{repeat}.db'}",
                "PREFECT_API_URL": "",  # Prefect's ephemeral API, as `skinrisk pipeline` runs by default
            },
            "servers": lambda repeat: {
                "MLFLOW_TRACKING_URI": config.mlflow_uri,
                "PREFECT_API_URL": config.prefect_api_url,
            },
        }
        for repeat in range(args.repeats):
            order = list(modes) if repeat % 2 == 0 else list(reversed(modes))  # alternate: load drifts
            for mode in order:
                # one Prefect home per mode: the ephemeral API creates its SQLite database on the first run only
                home = scratch / f"prefect-home-{mode}"
                results[mode].append(run_flows(scratch / f"{mode}-{repeat}", params, modes[mode](repeat), home))
    finally:
        for server in servers.SERVERS:
            servers.stop_server(server, config)
        for name in (config.mlflow_db, config.prefect_db):
            servers.drop_database(config.postgres_url, name)
        shutil.rmtree(scratch, ignore_errors=True)

    print(f"cpu cores: {os.cpu_count()}   load average at the end: {os.getloadavg()[0]:.1f}")
    print("\nserver start, launch to healthy (s)   first (creates the schema)   restart")
    for server in servers.SERVERS:
        print(f"  {server:<36} {cold[server]:>20.1f} {warm[server]:>9.1f}")
    keys = ("import_s", "training_s", "promotion_s", "total_s")
    print("\ntraining + promotion flows, each run a fresh process (s); run 1 of embedded creates its SQLite stores")
    print(f"  {'mode':<10}{'run':>4}" + "".join(f"{key:>14}" for key in keys))
    for mode, runs in results.items():
        for index, figures in enumerate(runs, 1):
            print(f"  {mode:<10}{index:>4}" + "".join(f"{figures[k]:>14.1f}" for k in keys))
    medians = {mode: statistics.median(r["total_s"] for r in runs) for mode, runs in results.items()}
    overhead = medians["servers"] - medians["embedded"]
    print(
        f"\nservers vs embedded (median total of {args.repeats}): {overhead:+.1f} s per pipeline run "
        f"({overhead / medians['embedded']:+.0%})"
    )


if __name__ == "__main__":
    main()
