"""Drift-monitor sensitivity: false alarms, the smallest shift detected per kind, and a real shift.

1. False alarms: ``--batches`` batches of ``--batch-size`` images drawn from the held-out cases
   (val + test) of the real HAM10000 sample, each compared with the training reference profile.
2. For each shift kind (age offset, body-site mix, brightness, red colour cast, blur), the smallest
   level of a small ladder whose shifted column drifts in at least ``--detect`` of ``--repeats``
   batches, and how often the alarm itself is raised at that level.
3. A real shift: reference from histopathology-confirmed cases, batch from follow-up cases (naevi
   monitored over time, another population and imaging routine), then head-and-neck sites against
   the rest; with a same-population control each time.

Per-column verdicts come from :func:`tasks.stages.monitor.column_drift`: the same Evidently stattests and
thresholds as the monitor's report (``tests/model/test_monitor.py`` checks they agree), without
rendering a report per batch. Batches are tested one image per lesion, as the monitor does.

    .venv/bin/python benchmarks/monitor_sensitivity.py [--data ../shared/data/ham10000-200px]
        [--model models/model.keras] [--weights auto|imagenet|none] [--size 128]

Without ``--model`` the model is untrained (random head) on an ImageNet MobileNetV2 backbone when the
weights are cached (``KERAS_HOME``, ``../shared/weights/keras``), else fully random: the embedding
and prediction columns then describe that model, not a trained one.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageEnhance, ImageFilter

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("DO_NOT_TRACK", "1")

from tasks import drift_profile as dp
from tasks.params import MonitorParams, PreprocessParams
from tasks.schema import RISK_LEVELS, raw_image_path
from tasks.stages import monitor as mon
from tasks.stages import reference as reference_stage

PROJECT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = PROJECT.parent / "shared" / "data" / "ham10000-200px"
IMAGENET_CACHE = PROJECT.parent / "shared" / "weights" / "keras"
HEAD_AND_NECK = ("face", "scalp", "neck", "ear")


@dataclass
class Pool:
    """Every case of the sample with its monitored features, computed once."""

    frame: pd.DataFrame  # cases.csv rows (image_id, lesion_id, dx_type, age, sex, localization, split)
    stats: pd.DataFrame
    sizes: pd.DataFrame
    outputs: dp.ModelOutputs


def _model(args, size: int, n_clinical: int, scratch: Path) -> Path:
    """The model file to monitor: ``--model``, or an untrained one saved to ``scratch``."""
    if args.model:
        return Path(args.model)
    from tasks.model import build_model
    from tasks.params import TrainParams

    weights = args.weights
    if weights == "auto":
        weights = "imagenet" if (IMAGENET_CACHE / "models").is_dir() or os.environ.get("KERAS_HOME") else "none"
    if weights == "imagenet" and not os.environ.get("KERAS_HOME"):
        os.environ["KERAS_HOME"] = str(IMAGENET_CACHE)
    alpha = 1.0 if weights == "imagenet" else 0.35
    model = build_model(
        size,
        n_clinical,
        len(RISK_LEVELS),
        TrainParams(weights=weights, alpha=alpha, image_units=16, clinical_units=8, fusion_units=16),
    )
    args.model_description = (
        f"untrained head on a {'ImageNet' if weights == 'imagenet' else 'random'} MobileNetV2 (alpha {alpha})"
    )
    path = scratch / "model.keras"
    model.save(path)
    return path


def _outputs_with_clinical(bundle, embeddings: np.ndarray, clinical: np.ndarray) -> dp.ModelOutputs:
    """Predictions for new clinical features on cached image embeddings (the fusion head only)."""
    from tasks.metrics import risk_probabilities
    from tasks.model import head_of

    probs = head_of(bundle.model).predict([embeddings, clinical], batch_size=256, verbose=0)
    risk = risk_probabilities(probs, bundle.target, bundle.summary.diagnoses, bundle.summary.risk_map)
    risk = np.asarray(risk, dtype=np.float64)
    return dp.ModelOutputs(embeddings, risk, bundle.called_levels(risk))


def _load_shifted(raw_dir: Path, image_ids, size: int, change: Callable[[Image.Image], Image.Image]) -> np.ndarray:
    """Original files, changed at their own resolution, then resized as tasks.images.load_image does."""
    out = np.empty((len(image_ids), size, size, 3), np.uint8)
    for i, image_id in enumerate(image_ids):
        with Image.open(raw_image_path(raw_dir, image_id)) as image:
            changed = change(image.convert("RGB"))
        out[i] = np.asarray(changed.resize((size, size), Image.Resampling.BILINEAR))
    return out


def _table(pool: Pool, rows: np.ndarray, pca: dp.EmbeddingPCA, frame=None, outputs=None, stats=None):
    frame = pool.frame.iloc[rows].reset_index(drop=True) if frame is None else frame
    outputs = outputs or dp.ModelOutputs(
        pool.outputs.embeddings[rows], pool.outputs.risk_probs[rows], pool.outputs.called_levels[rows]
    )
    stats = pool.stats.iloc[rows] if stats is None else stats
    return dp.profile_table(frame, stats, outputs, pca, pool.sizes.iloc[rows])


def _older(frame: pd.DataFrame, years: float, rng) -> pd.DataFrame:
    return frame.assign(age=np.minimum(frame["age"] + years, 85))


def _sites(frame: pd.DataFrame, share: float, rng) -> pd.DataFrame:
    moved = rng.random(len(frame)) < share  # batches are one image per lesion: per case is per lesion
    sites = frame["localization"].to_numpy(dtype=object).copy()
    sites[moved] = rng.choice(HEAD_AND_NECK, size=int(moved.sum()))
    return frame.assign(localization=sites)


def _red(factor: float):
    def change(image: Image.Image) -> Image.Image:
        red, green, blue = image.split()
        return Image.merge("RGB", (red.point(lambda v: min(255, round(v * factor))), green, blue))

    return change


CLINICAL_SHIFTS = {
    # Whole 5-year steps: HAM10000 ages are multiples of 5, and an offset off that lattice would be
    # detected for its odd values rather than for an older population.
    "age offset (years)": ("age", _older, [5, 10, 15, 20]),
    "head/neck share": ("localization", _sites, [0.05, 0.1, 0.2, 0.3, 0.5]),
}
IMAGE_SHIFTS = {
    "brightness factor": (
        "brightness",
        lambda f: lambda im: ImageEnhance.Brightness(im).enhance(f),
        [1.02, 1.05, 1.1, 1.2, 1.4],
    ),
    "red channel factor": ("mean_red", _red, [1.02, 1.05, 1.1, 1.2]),
    "blur radius (px)": (
        "sharpness",
        lambda r: lambda im: im.filter(ImageFilter.GaussianBlur(r)),
        [0.25, 0.5, 1.0, 2.0],
    ),
}


def _batches(
    pool: Pool, candidates: np.ndarray, n: int, size: int, params: MonitorParams, seed: int
) -> list[np.ndarray]:
    """Random batches of held-out lesions with all their images (as a clinic sends them), about ``size``
    images each, reduced to one image per lesion as the monitor tests them."""
    rng = np.random.default_rng(seed)
    lesions = pool.frame["lesion_id"].to_numpy()
    by_lesion = pd.Series(candidates).groupby(lesions[candidates]).apply(list)
    batches = []
    for _ in range(n):
        drawn: list[int] = []
        for lesion in rng.permutation(by_lesion.index):
            if len(drawn) >= size:
                break
            drawn += by_lesion[lesion]
        drawn_rows = np.sort(np.array(drawn))
        batches.append(drawn_rows[dp.one_per_lesion(lesions[drawn_rows], params.seed)])
    return batches


def _verdict_line(name: str, result: mon.DriftResult, n_ref: int, n_cur: int) -> str:
    groups = {g: info["drifted_columns"] for g, info in result.group_summary().items() if info["drifted_columns"]}
    listed = "; ".join(f"{g}: {', '.join(c)}" for g, c in groups.items()) or "none"
    return (
        f"  {name:<38} {n_ref:>5} vs {n_cur:>5}  {'ALARM' if result.alarm else 'no alarm':<8} "
        f"{result.n_drifted:>2}/{result.n_columns} drifted  [{listed}]"
    )


def _real_shift(pool: Pool, bundle, params: MonitorParams, name: str, reference_mask, batch_mask, seed: int) -> str:
    """Reference from the cases in ``reference_mask`` (one per lesion, up to reference_size), batch from
    ``batch_mask`` (one per lesion, up to 500), both from the whole sample."""
    rng = np.random.default_rng(seed)
    lesions = pool.frame["lesion_id"].to_numpy()

    def pick(mask, limit):
        rows = np.flatnonzero(mask)
        rows = rows[dp.one_per_lesion(lesions[rows], seed)]
        return np.sort(rng.choice(rows, size=min(limit, len(rows)), replace=False))

    ref_rows = pick(reference_mask, params.reference_size)
    cur_rows = pick(batch_mask & ~np.isin(lesions, lesions[ref_rows]), 500)
    pca = dp.EmbeddingPCA.fit(pool.outputs.embeddings[ref_rows], params.embedding_components, params.seed)
    reference, current = _table(pool, ref_rows, pca), _table(pool, cur_rows, pca)
    groups = dp.column_groups(reference, pca)
    return _verdict_line(name, mon.column_drift(reference, current, groups, params), len(ref_rows), len(cur_rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--model", default=None, help="a trained .keras model (default: an untrained one)")
    parser.add_argument("--weights", choices=("auto", "imagenet", "none"), default="auto")
    parser.add_argument("--size", type=int, default=128, help="image size without --model")
    parser.add_argument("--batches", type=int, default=20, help="same-distribution batches")
    parser.add_argument("--batch-size", type=int, default=200, help="images per batch, before one per lesion")
    parser.add_argument("--repeats", type=int, default=5, help="batches per shift level")
    parser.add_argument("--detect", type=int, default=4, help="detected in at least this many of --repeats")
    parser.add_argument("--synthetic-images", type=int, default=2400, help="without real data")
    args = parser.parse_args()
    args.model_description = f"model {args.model}" if args.model else ""
    params = MonitorParams()
    started = time.perf_counter()

    from tasks.images import decode_images
    from tasks.ingest import import_dataset
    from tasks.schema import CASES_FILE
    from tasks.stages.preprocess import preprocess

    with tempfile.TemporaryDirectory(prefix="bench-monitor-") as scratch_name:
        scratch = Path(scratch_name)
        source, data_name = args.data, args.data.name
        if not args.data.is_dir():
            from tasks.synth import synthesize_ham10000

            print(f"no real data at {args.data}: using a synthetic sample of {args.synthetic_images} images")
            source, data_name = scratch / "synthetic", "synthetic"
            synthesize_ham10000(source, n_images=args.synthetic_images, seed=7, width=200, height=150)
        raw_dir = scratch / "raw"
        import_dataset(source, raw_dir, progress=False)
        size = args.size
        if args.model:
            from tasks.model import load_model

            size = int(load_model(Path(args.model)).inputs[0].shape[1])
        processed = scratch / "processed"
        preprocess(raw_dir, processed, PreprocessParams(image_size=size))
        from tasks.clinical import ClinicalEncoder

        encoder = ClinicalEncoder.load(processed / "encoder.json")
        model_path = _model(args, size, encoder.n_features, scratch)

        reference_path = reference_stage.build_reference_profile(
            model_path, processed, scratch / dp.REFERENCE_FILE, params, raw_dir=raw_dir
        )
        profile = dp.ReferenceProfile.load(reference_path)
        from tasks.model import load_model

        bundle = profile.bundle(load_model(model_path))
        frame = pd.read_csv(processed / CASES_FILE, dtype={"image_id": str, "lesion_id": str}, keep_default_na=False)
        frame["age"] = pd.to_numeric(frame["age"], errors="coerce")
        paths = [raw_image_path(raw_dir, i) for i in frame["image_id"]]
        images = decode_images(paths, size)
        pool = Pool(
            frame=frame,
            stats=dp.image_statistics(images),
            sizes=dp.original_sizes(paths),
            outputs=dp.model_outputs(bundle, images, encoder.transform(frame)),
        )
        print(
            f"data: {data_name} ({len(frame)} images with an age, {frame['lesion_id'].nunique()} lesions), "
            f"{size}px; {args.model_description}; reference: {len(profile.table)} training lesions; "
            f"stattest threshold {params.stattest_threshold}, alarm at {params.drift_share:.0%} of "
            f"{sum(len(c) for c in profile.groups.values())} columns  [setup {time.perf_counter() - started:.0f} s]"
        )

        held_out = np.flatnonzero(frame["split"].isin(["val", "test"]).to_numpy())
        null_batches = _batches(pool, held_out, args.batches, args.batch_size, params, seed=1)
        results = [
            mon.column_drift(profile.table, _table(pool, b, profile.pca), profile.groups, params) for b in null_batches
        ]
        alarms = sum(r.alarm for r in results)
        drifted = pd.Series([c for r in results for c in r.drifted_columns]).value_counts()
        per_batch = np.mean([r.n_drifted for r in results])
        print(
            f"\nsame distribution: {args.batches} batches of ~{args.batch_size} held-out images, whole lesions "
            f"(~{np.mean([len(b) for b in null_batches]):.0f} lesions each)\n"
            f"  false alarms {alarms}/{args.batches} ({alarms / args.batches:.0%}); drifted columns per batch "
            f"{per_batch:.2f} of {results[0].n_columns} ({per_batch / results[0].n_columns:.1%}); most often: "
            + (", ".join(f"{c} {n}/{args.batches}" for c, n in drifted.head(4).items()) or "none")
        )

        print(
            f"\nsmallest shift whose column drifts in >= {args.detect}/{args.repeats} batches "
            f"(per level: detections/{args.repeats}, alarms/{args.repeats})"
        )
        shift_batches = _batches(pool, held_out, args.repeats, args.batch_size, params, seed=2)
        for kind, (column, change, ladder) in {**CLINICAL_SHIFTS, **IMAGE_SHIFTS}.items():
            tried, found = [], None
            for level in ladder:
                detections = alarms_here = 0
                for i, rows in enumerate(shift_batches):
                    if kind in CLINICAL_SHIFTS:
                        shifted = change(pool.frame.iloc[rows].reset_index(drop=True), level, np.random.default_rng(i))
                        outputs = _outputs_with_clinical(
                            bundle, pool.outputs.embeddings[rows], encoder.transform(shifted)
                        )
                        table = _table(pool, rows, profile.pca, frame=shifted, outputs=outputs)
                    else:
                        ids = pool.frame["image_id"].to_numpy()[rows]
                        shifted_images = _load_shifted(raw_dir, ids, size, change(level))
                        frame_rows = pool.frame.iloc[rows].reset_index(drop=True)
                        outputs = dp.model_outputs(bundle, shifted_images, encoder.transform(frame_rows))
                        table = _table(
                            pool, rows, profile.pca, outputs=outputs, stats=dp.image_statistics(shifted_images)
                        )
                    result = mon.column_drift(profile.table, table, profile.groups, params)
                    detections += result.columns[column].drifted
                    alarms_here += result.alarm
                tried.append(f"{level:g}: {detections},{alarms_here}")
                if detections >= args.detect:
                    found = level
                    break
            smallest = f"{found:g}" if found is not None else f"> {ladder[-1]:g}"
            print(f"  {kind:<20} {column:<13} smallest {smallest:<7} tried {'  '.join(tried)}")

        print("\nreal shifts (reference vs batch lesions, verdict, drifted columns by group)")
        dx_type = frame["dx_type"].to_numpy()
        sites = frame["localization"].to_numpy()
        split_rng = np.random.default_rng(3)
        half = split_rng.random(len(frame)) < 0.5  # a same-population control: histo vs histo
        lesion_half = frame["lesion_id"].map(dict(zip(frame["lesion_id"], half, strict=True))).to_numpy(bool)
        head = np.isin(sites, HEAD_AND_NECK)
        for name, ref_mask, cur_mask in (
            ("histo vs histo (control)", (dx_type == "histo") & lesion_half, (dx_type == "histo") & ~lesion_half),
            ("histo vs follow_up", dx_type == "histo", dx_type == "follow_up"),
            ("body vs body (control)", ~head & lesion_half, ~head & ~lesion_half),
            ("body vs head/neck sites", ~head, head),
        ):
            print(_real_shift(pool, bundle, params, name, ref_mask, cur_mask, seed=4))
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
