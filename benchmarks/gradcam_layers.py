"""Which MobileNetV2 layer's Grad-CAM lands on the lesion: heatmap mass inside a known lesion.

A synthetic HAM10000 sample (``tasks.synth``, whose ``synthetic_truth.csv`` gives each lesion's
ellipse) is imported, preprocessed at ``--size`` and a model is trained on it with the project's
own :func:`tasks.stages.train.train` (ImageNet backbone, a few epochs). On every test image, for each
candidate layer, Grad-CAM of the predicted risk level (as the explain stage draws it) is
upsampled to the image and scored against the lesion's ellipse (mapped through the preprocess
resize, which stretches the whole frame to a square):

- mass inside: the share of the heatmap's mass inside the ellipse (an all-zero map counts 0);
- peak inside: whether the map's hottest pixel lies inside it (the pointing game).

Baselines: a uniform map (its mass inside is the lesion's share of the frame), a random 4 x 4
map upsampled, and a centre prior (a Gaussian at the centre, sigma a quarter of the side).
Prints mean ± sd per layer, and the per-image win rate of each layer against ``out_relu``.

    .venv/bin/python benchmarks/gradcam_layers.py [--images 500] [--size 128] [--work-dir DIR]

``--work-dir`` keeps the sample and the model between runs (training is skipped when its model
exists), so the scoring can be rerun on other layers cheaply.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("DO_NOT_TRACK", "1")

import numpy as np
import pandas as pd

from tasks.images import normalize_for_mobilenet
from tasks.stages.explain import bundle_assignment, risk_level_gradcam, upsample_heatmap

CANDIDATES = ("out_relu", "block_16_expand_relu", "block_13_expand_relu", "block_10_expand_relu", "block_6_expand_relu")


def lesion_masks(truth: pd.DataFrame, image_ids: np.ndarray, width: int, height: int, size: int) -> np.ndarray:
    """Each image's lesion ellipse as a ``size`` x ``size`` boolean mask, after the preprocess resize."""
    rows = truth.set_index("image_id").loc[list(image_ids)]
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    sx, sy = size / width, size / height
    masks = np.empty((len(rows), size, size), dtype=bool)
    for k, (cx, cy, rx, ry) in enumerate(rows[["center_x", "center_y", "radius_x", "radius_y"]].to_numpy()):
        masks[k] = ((xs - cx * sx) / (rx * sx)) ** 2 + ((ys - cy * sy) / (ry * sy)) ** 2 <= 1.0
    return masks


def mass_inside(field: np.ndarray, mask: np.ndarray) -> float:
    total = float(field.sum())
    return float(field[mask].sum()) / total if total > 0 else 0.0


def peak_inside(field: np.ndarray, mask: np.ndarray) -> bool:
    return bool(field.max() > 0 and mask.flat[int(np.argmax(field))])


def prepare(work: Path, n_images: int, width: int, height: int, size: int, seed: int, epochs: tuple[int, int]) -> Path:
    """Synthesize, import, preprocess and train under ``work`` (each step skipped when done)."""
    from tasks.ingest import import_dataset
    from tasks.params import PreprocessParams, TrainParams
    from tasks.stages.preprocess import preprocess
    from tasks.stages.train import train
    from tasks.synth import synthesize_ham10000

    if not (work / "source").exists():
        synthesize_ham10000(work / "source", n_images=n_images, seed=seed, width=width, height=height, workers=1)
    if not (work / "raw").exists():
        import_dataset(work / "source", work / "raw", progress=False)
    if not (work / "processed").exists():
        preprocess(work / "raw", work / "processed", PreprocessParams(image_size=size, workers=1))
    model_path = work / "models" / "model.keras"
    if not model_path.exists():
        started = time.perf_counter()
        params = TrainParams(weights="imagenet", head_epochs=epochs[0], finetune_epochs=epochs[1], seed=seed)
        train(work / "processed", work / "models", work / "reports", params)
        print(f"trained in {time.perf_counter() - started:.0f} s")
    return model_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=500, help="synthetic images (about 15%% are test)")
    parser.add_argument("--width", type=int, default=256, help="synthetic image width (height: 3/4 of it)")
    parser.add_argument("--size", type=int, default=128, help="model input side (preprocess.image_size)")
    parser.add_argument("--head-epochs", type=int, default=4)
    parser.add_argument("--finetune-epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--layers", nargs="+", default=list(CANDIDATES))
    parser.add_argument("--work-dir", type=Path, help="keep the sample and the model here (default: a temp dir)")
    args = parser.parse_args()
    width, height = args.width, args.width * 3 // 4

    with tempfile.TemporaryDirectory(prefix="bench-gradcam-") as scratch:
        work = args.work_dir or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        model_path = prepare(
            work, args.images, width, height, args.size, args.seed, (args.head_epochs, args.finetune_epochs)
        )
        from tasks.dataset import load_split
        from tasks.model import single_view
        from tasks.scored_model import bundle_from_files, predict_risk

        bundle = bundle_from_files(model_path, work / "processed")
        test = load_split(work / "processed", "test")
        truth = pd.read_csv(work / "source" / "synthetic_truth.csv")
        masks = lesion_masks(truth, test.image_id, width, height, args.size)
        probs = predict_risk(bundle, test.images, test.clinical)
        predicted = bundle.called_levels(probs)
        accuracy = float((predicted == test.risk).mean())
        model, assignment = single_view(bundle.model), bundle_assignment(bundle)

        rows: dict[str, dict[str, np.ndarray]] = {}
        for layer in args.layers:
            started = time.perf_counter()
            shares, peaks, empty, grid = [], [], 0, None
            for k in range(len(test)):
                cam = risk_level_gradcam(
                    model,
                    normalize_for_mobilenet(test.images[k]),
                    test.clinical[k],
                    assignment,
                    level_index=int(predicted[k]),
                    last_conv_layer_name=layer,
                )
                grid = cam.heatmap.shape
                empty += int(cam.heatmap.max() <= 0)
                field = upsample_heatmap(cam.heatmap, args.size)
                shares.append(mass_inside(field, masks[k]))
                peaks.append(peak_inside(field, masks[k]))
            rows[f"{layer} {grid[0]}x{grid[1]}"] = {
                "mass": np.array(shares),
                "peak": np.array(peaks),
                "empty": np.array([empty]),
                "seconds": np.array([(time.perf_counter() - started) / len(test)]),
            }

        rng = np.random.default_rng(args.seed)
        side = np.arange(args.size) + 0.5
        centre = np.exp(
            -((side[:, None] - args.size / 2) ** 2 + (side[None, :] - args.size / 2) ** 2) / (2 * (args.size / 4) ** 2)
        )
        baselines = {
            "uniform (lesion area)": [(m.mean(), np.nan) for m in masks],  # a flat map has no peak
            "random 4x4": [],
            "centre prior": [(mass_inside(centre, m), peak_inside(centre, m)) for m in masks],
        }
        for m in masks:
            field = upsample_heatmap(rng.uniform(0, 1, (4, 4)).astype(np.float32), args.size)
            baselines["random 4x4"].append((mass_inside(field, m), peak_inside(field, m)))

        print(
            f"\n{len(test)} test images at {args.size} px, {args.images} synthetic images of {width}x{height}; "
            f"model accuracy on the 3 levels {accuracy:.2f}; Grad-CAM of the predicted level\n"
        )
        print(f"{'map':<28} {'mass inside (mean ± sd)':>24} {'peak inside':>12} {'empty':>6} {'s/img':>6}")
        for name, row in rows.items():
            mass = row["mass"]
            print(
                f"{name:<28} {mass.mean():>14.3f} ± {mass.std(ddof=1):.3f} {row['peak'].mean():>11.0%} "
                f"{int(row['empty'][0]):>6} {row['seconds'][0]:>6.3f}"
            )
        for name, values in baselines.items():
            mass = np.array([v[0] for v in values])
            peak = np.array([v[1] for v in values], dtype=np.float64)
            peak_text = "-" if np.isnan(peak).all() else f"{peak.mean():.0%}"
            print(f"{name:<28} {mass.mean():>14.3f} ± {mass.std(ddof=1):.3f} {peak_text:>11}")
        reference = next(iter(rows.values()))["mass"]
        print("\nper image, against the first map: share of images where the layer has more mass inside")
        for name, row in list(rows.items())[1:]:
            print(f"  {name:<28} {(row['mass'] > reference).mean():.0%}")


if __name__ == "__main__":
    main()
