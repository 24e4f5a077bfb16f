"""Latency of explaining one case (Grad-CAM + clinical SHAP + rendering), the model already loaded.

Times :func:`tasks.stages.explain.explain_case` end to end, image file decoding included, over
``--cases`` synthetic 600 x 450 dermoscopy-like JPEGs after ``--warmup`` cases (the first three
calls run eagerly, the fourth traces the TensorFlow functions). The first (cold) case, what a
one-off ``skinrisk explain`` costs, is reported too. Uses ``--model`` with ``--processed-dir`` (encoder, risk map,
training background) when they exist; otherwise an untrained model of the default size
(128 x 128, alpha 1.0, random weights) with the neutral SHAP background: the cost of the
computation does not depend on the weights. Target: median under 2 s per case.

    .venv/bin/python benchmarks/explain_latency.py [--model models/model.keras] [--processed-dir data/processed]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pandas as pd

from tasks.clinical import ClinicalEncoder
from tasks.params import ExplainParams, PreprocessParams, TrainParams
from tasks.schema import CASES_FILE, DIAGNOSES, LOCALIZATIONS, RISK_LEVELS, SEXES
from tasks.scored_model import Bundle, load_bundle
from tasks.stages.explain import explain_case, training_background
from tasks.synth import IMAGES_PART_1, IMAGES_PART_2, synthesize_ham10000


def untrained_bundle(image_size: int) -> Bundle:
    """A default-size model with random weights and a plausible encoder (HAM10000 ages), saved as
    the train stage saves it: inside its four test-time views and a temperature."""
    from tasks.model import build_model, inference_model

    encoder = ClinicalEncoder(age_mean=51.9, age_std=16.9, age_fill=50.0, missing_policy="drop")
    base = build_model(image_size, encoder.n_features, len(RISK_LEVELS), TrainParams(weights="none", alpha=1.0))
    model = inference_model(base, "flips", 0.9)
    summary = {"image_size": image_size, "diagnoses": list(DIAGNOSES), "risk_map": PreprocessParams().risk_map}
    operating_point = {"target": "risk", "threshold": 0.2, "target_recall": 0.9}
    return Bundle(model=model, encoder=encoder, summary=summary, operating_point=operating_point)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("models/model.keras"))
    parser.add_argument("--processed-dir", type=Path, default=Path("data/processed"))
    parser.add_argument("--cases", type=int, default=10, help="timed cases")
    parser.add_argument("--warmup", type=int, default=5, help="untimed cases first (eager, then tracing)")
    parser.add_argument("--image-size", type=int, default=128, help="input side of the untrained fallback model")
    args = parser.parse_args()

    started = time.perf_counter()
    if args.model.exists() and args.processed_dir.is_dir():
        bundle = load_bundle(str(args.model), args.processed_dir, args.model.parent)
        source = f"{args.model} ({bundle.target} target)"
    else:
        bundle = untrained_bundle(args.image_size)
        source = f"untrained MobileNetV2 alpha 1.0 ({args.model} not found)"
    load_seconds = time.perf_counter() - started
    params = ExplainParams()
    background = None
    if (args.processed_dir / CASES_FILE).exists():
        background = training_background(args.processed_dir, params.shap_background, params.seed)

    n = args.warmup + args.cases
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="bench-explain-") as scratch:
        scratch = Path(scratch)
        synthesize_ham10000(scratch / "images", n_images=max(n, 14), seed=3, workers=1)
        images = sorted(
            [*(scratch / "images" / IMAGES_PART_1).glob("*.jpg"), *(scratch / "images" / IMAGES_PART_2).glob("*.jpg")]
        )
        cases = pd.DataFrame(
            {
                "age": rng.choice(np.arange(20, 90, 5), n).astype(float),
                "sex": rng.choice([s for s in SEXES if s in bundle.encoder.sexes], n),
                "localization": rng.choice([s for s in LOCALIZATIONS if s in bundle.encoder.localizations], n),
            }
        )
        seconds = []
        for k in range(n):
            case = cases.iloc[k]
            tick = time.perf_counter()
            explain_case(
                bundle,
                images[k],
                float(case["age"]),
                str(case["sex"]),
                str(case["localization"]),
                scratch / "out" / str(k),
                params,
                background=background,
            )
            seconds.append(time.perf_counter() - tick)

    timed = seconds[args.warmup :]
    p90 = float(np.quantile(timed, 0.9))
    print(f"model: {source}, input {bundle.summary.image_size} px, loaded in {load_seconds:.1f} s")
    print(
        f"SHAP background: {'training cases' if background is not None else 'neutral (encoder)'}, cores: {os.cpu_count()}"
    )
    print(f"first case (cold, eager): {seconds[0]:.2f} s; warm-up cases: {args.warmup}")
    print(f"explain_case over {len(timed)} cases: median {statistics.median(timed):.3f} s, p90 {p90:.3f} s per case")
    print(f"target < 2 s: {'met' if statistics.median(timed) < 2.0 else 'NOT met'}")


if __name__ == "__main__":
    main()
