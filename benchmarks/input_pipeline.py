"""Training throughput through the project's tf.data pipeline against model.fit on in-memory tensors.

Both fit the default model (frozen backbone: the head phase) on the same training images; the
pipeline adds shuffling, augmentation and normalization on the fly. Target: at least 0.9.

    .venv/bin/python benchmarks/input_pipeline.py [--processed-dir data/processed] [--images 1024]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def images_per_second(model, data, n_images: int, steps: int | None = None) -> float:
    started = time.perf_counter()
    model.fit(data, epochs=1, steps_per_epoch=steps, verbose=0, shuffle=False)
    return n_images / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processed-dir", type=Path, default=Path("data/processed"))
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args()

    import keras
    import numpy as np

    from tasks.dataset import load_split, make_dataset
    from tasks.images import normalize_for_mobilenet
    from tasks.model import build_model
    from tasks.params import load_params
    from tasks.schema import read_preprocess_summary

    params = load_params(args.params).train
    summary = read_preprocess_summary(args.processed_dir)
    train = load_split(args.processed_dir, "train")
    n = min(args.images, len(train))
    n -= n % params.batch_size
    subset = type(train)(**{k: getattr(train, k)[:n] for k in train.__dataclass_fields__})
    model = build_model(summary.image_size, train.clinical.shape[1], 3, params)
    model.compile(optimizer=keras.optimizers.Adam(params.learning_rate), loss="sparse_categorical_crossentropy")

    tensors = ({"image": normalize_for_mobilenet(subset.images), "clinical": subset.clinical}, subset.risk)
    in_memory = lambda: model.fit(*tensors, batch_size=params.batch_size, epochs=1, verbose=0)  # noqa: E731
    pipeline = make_dataset(
        subset, subset.risk, batch_size=params.batch_size, training=True, augment=params.augment, seed=params.seed
    )

    in_memory()  # warm-up: graph tracing
    images_per_second(model, pipeline, n)
    started = time.perf_counter()
    in_memory()
    memory_rate = n / (time.perf_counter() - started)
    pipeline_rate = np.median([images_per_second(model, pipeline, n) for _ in range(2)])
    print(
        f"images: {n} at {summary['image_size']}x{summary['image_size']}, batch {params.batch_size}, "
        f"weights {params.weights}, alpha {params.alpha}, cores {os.cpu_count()}"
    )
    print(f"model.fit on in-memory tensors:  {memory_rate:8.1f} images/s")
    print(f"model.fit through the pipeline:  {pipeline_rate:8.1f} images/s (shuffle + augmentation + normalization)")
    print(f"ratio:                           {pipeline_rate / memory_rate:8.2f}  (target >= 0.90)")


if __name__ == "__main__":
    main()
