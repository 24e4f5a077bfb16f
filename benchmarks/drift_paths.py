"""Why ``tasks.stages.monitor.column_drift`` exists beside ``detect_drift``: seconds per batch of each.

``detect_drift`` builds Evidently's data-drift report (what the monitor stage logs and shows);
``column_drift`` runs the same Evidently stattests on the same columns without building a report,
for ``benchmarks/monitor_sensitivity.py``, which tests up to 130 batches. Both are timed here on
tables with the monitor's real layout (params.yaml ``monitor``: a 1,000-case reference, 5 embedding
components; 3 clinical, 8 image, 4 prediction columns) and batches of ``--batch-size`` cases, half of
them shifted in age and brightness; the two must give the same verdicts.

    .venv/bin/python benchmarks/drift_paths.py [--batches 10] [--batch-size 200]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("DO_NOT_TRACK", "1")

import numpy as np
import pandas as pd

from tasks.drift_profile import IMAGE_COLUMNS, PREDICTION_COLUMNS, SIZE_COLUMNS
from tasks.params import MonitorParams
from tasks.schema import LOCALIZATIONS, RISK_LEVELS, SEXES
from tasks.stages.monitor import column_drift, detect_drift

EMBEDDING = [f"embedding_pc{i}" for i in range(1, 6)]
GROUPS = {
    "clinical": ["age", "sex", "localization"],
    "image": [*IMAGE_COLUMNS, *SIZE_COLUMNS],
    "embedding": EMBEDDING,
    "prediction": list(PREDICTION_COLUMNS),
}


def table(rng: np.random.Generator, n: int, shift: float = 0.0) -> pd.DataFrame:
    """Cases laid out as ``tasks.stages.monitor.profile_table`` lays them out; ``shift`` moves age and brightness."""
    frame = {
        "age": rng.normal(52 + 8 * shift, 16, n).round(-1),
        "sex": rng.choice(list(SEXES), n),
        "localization": rng.choice(list(LOCALIZATIONS), n),
    }
    for i, name in enumerate(IMAGE_COLUMNS):
        frame[name] = rng.normal(120 + (15 * shift if name == "brightness" else 0), 20 + i, n)
    frame["image_width"] = np.full(n, 600.0)
    frame["image_height"] = np.full(n, 450.0)
    for name in EMBEDDING:
        frame[name] = rng.normal(0, 1, n)
    probs = rng.dirichlet([6, 3, 1], n)
    for j, level in enumerate(RISK_LEVELS):
        frame[f"p_{level}"] = probs[:, j]
    frame["predicted_level"] = np.asarray(RISK_LEVELS, dtype=object)[probs.argmax(1)]
    return pd.DataFrame(frame)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--reference-size", type=int, default=1000)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    params = MonitorParams()
    reference = table(rng, args.reference_size)
    batches = [table(rng, args.batch_size, shift=float(i % 2)) for i in range(args.batches)]
    detect_drift(reference, batches[0], GROUPS, params)  # imports and first-call set-up, not timed
    column_drift(reference, batches[0], GROUPS, params)

    timings: dict[str, list[float]] = {"detect_drift (report)": [], "column_drift (stattests)": []}
    for batch in batches:
        start = time.perf_counter()
        report = detect_drift(reference, batch, GROUPS, params)
        timings["detect_drift (report)"].append(time.perf_counter() - start)
        start = time.perf_counter()
        quick = column_drift(reference, batch, GROUPS, params)
        timings["column_drift (stattests)"].append(time.perf_counter() - start)
        if report.drifted_columns != quick.drifted_columns:
            raise SystemExit(f"the two paths disagree: {report.drifted_columns} vs {quick.drifted_columns}")

    n_columns = sum(len(v) for v in GROUPS.values())
    print(
        f"{args.batches} batches of {args.batch_size} cases vs a {args.reference_size}-case reference, {n_columns} columns"
    )
    medians = {name: statistics.median(values) for name, values in timings.items()}
    for name, median in medians.items():
        print(f"  {name:26s} median {median * 1000:8.1f} ms per batch")
    report_s, quick_s = medians.values()
    print(f"  the report costs {report_s / quick_s:.0f}x the stattests alone; verdicts identical on every batch")
    # monitor_sensitivity.py's defaults: 20 null batches, then up to 22 shift levels x 5 repeats
    most = 20 + 22 * 5
    print(
        f"  monitor_sensitivity.py's default run (up to {most} batches): drift tests take "
        f"{most * report_s / 60:.1f} min with reports, {most * quick_s:.0f} s without"
    )


if __name__ == "__main__":
    main()
