"""Training candidates measured by lesion-grouped, stratified K-fold cross-validation on real data.

One split of HAM10000 holds about 115 high-risk test images, so the figures of one run swing by
several points; a default chosen on it is chosen on noise. Here the imported sample is cut into K
folds by lesion (every image of a lesion in one fold), stratified by risk level. For each fold the
other folds are split again, by lesion, into training and validation exactly as
``skinrisk preprocess`` splits (the clinical encoder fitted on that training part), and the
candidate is trained and evaluated by the pipeline's own ``train`` and ``evaluate`` functions:
early stopping, calibration and the triage threshold use only the inner validation part; the
held-out fold is scored once. The table gives the mean and the spread (standard deviation)
over the folds of:

- high-risk (melanoma) ROC-AUC and PR-AUC (average precision), from calibrated P(high);
- 3-level balanced accuracy of the called levels (``tasks.decision``: the level most likely
  relative to its training share), and of the plain argmax beside it;
- high-risk recall, specificity and the share of low-risk lesions not referred at the operating
  point (``evaluate.target_recall``, the threshold chosen on the inner validation part), and the
  recall and share not referred at the stricter point chosen there for recall 0.95 ("op95");
- expected calibration error (top label, 15 bins).

    .venv/bin/python benchmarks/cv_quality.py --candidate default [--set train.KEY=VALUE ...]
        [--data ../shared/data/ham10000-200px] [--work /tmp/skinrisk-cv] [--folds 5]
    .venv/bin/python benchmarks/cv_quality.py --candidate default-dihedral --rescore default --views dihedral
    .venv/bin/python benchmarks/cv_quality.py --table     # every candidate measured so far

A fold already measured in WORK/<candidate>/ is not trained again (rerun to resume). The fold
assignment depends only on the imported data and ``--seed``, so candidates are compared on the
same folds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ham10000-200px"
FIGURES = (
    ("high_risk_roc_auc", "high AUC"),
    ("high_risk_pr_auc", "high PR-AUC"),
    ("balanced_accuracy", "3-level BA"),
    ("balanced_accuracy_argmax", "BA argmax"),
    ("high_risk_recall", "recall@op"),
    ("specificity", "specificity@op"),
    ("low_risk_spared", "low spared@op"),
    ("high_risk_recall_95", "recall@op95"),
    ("low_risk_spared_95", "spared@op95"),
    ("ece", "ECE"),
)


def fold_assignment(cases, n_folds: int, seed: int):
    """Fold index of every case: scikit-learn's StratifiedGroupKFold by lesion, by risk level."""
    import numpy as np
    from sklearn.model_selection import StratifiedGroupKFold

    folds = np.full(len(cases), -1)
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for k, (_, held_out) in enumerate(splitter.split(cases, cases["risk_level"], cases["lesion_id"])):
        folds[held_out] = k
    return folds


def write_fold(base: Path, out: Path, cases, folds, fold: int, val_fraction: float, seed: int, missing: str) -> None:
    """A processed directory whose test split is ``fold``, laid out as ``skinrisk preprocess`` writes it."""
    import numpy as np

    from tasks.clinical import ClinicalEncoder
    from tasks.schema import DIAGNOSES, RISK_LEVELS
    from tasks.stages.preprocess import first_group_fold

    if (out / "preprocess.json").exists():
        return
    staging = out.with_name(out.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    frame = cases.copy()
    split = np.where(folds == fold, "test", "train").astype(object)
    rest = np.flatnonzero(folds != fold)
    n_splits = max(2, round(1 / val_fraction))
    val = rest[
        first_group_fold(frame["risk_level"].to_numpy()[rest], frame["lesion_id"].to_numpy()[rest], n_splits, seed)
    ]
    split[val] = "val"
    frame["split"] = split
    encoder = ClinicalEncoder.fit(frame.loc[frame["split"] == "train"], missing)
    clinical = encoder.transform(frame)
    for name in ("train", "val", "test"):
        rows = (frame["split"] == name).to_numpy()
        np.savez(
            staging / f"{name}.npz",
            image_rows=np.flatnonzero(rows),
            clinical=clinical[rows],
            risk=frame.loc[rows, "risk_level"].map(RISK_LEVELS.index).to_numpy(np.int64),
            dx=frame.loc[rows, "dx"].map(list(DIAGNOSES).index).to_numpy(np.int64),
            image_id=frame.loc[rows, "image_id"].to_numpy(str),
        )
    (staging / "images.npy").symlink_to((base / "images.npy").resolve())
    frame.to_csv(staging / "cases.csv", index=False)
    encoder.save(staging / "encoder.json")
    summary = json.loads((base / "preprocess.json").read_text(encoding="utf-8"))
    summary["counts"] = {
        name: {level: int(((frame["split"] == name) & (frame["risk_level"] == level)).sum()) for level in RISK_LEVELS}
        for name in ("train", "val", "test")
    }
    summary["lesions"] = {
        name: int(frame.loc[frame["split"] == name, "lesion_id"].nunique()) for name in summary["counts"]
    }
    summary["cv_fold"] = fold
    (staging / "preprocess.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    staging.rename(out)


def fold_figures(reports: Path, models: Path, processed: Path) -> dict:
    """The figures of one held-out fold, from what ``evaluate`` wrote (predictions, threshold) and
    the fold's training shares (the 3-level decision, :mod:`tasks.decision`)."""
    import pandas as pd
    from sklearn.metrics import average_precision_score, roc_auc_score

    from tasks.decision import called_levels, level_prior
    from tasks.metrics import _balanced_accuracy, expected_calibration_error, triage_figures
    from tasks.schema import RISK_LEVELS

    predictions = pd.read_csv(reports / "predictions.csv")
    y = predictions["actual"].map(RISK_LEVELS.index).to_numpy()
    probs = predictions[[f"p_{level}" for level in RISK_LEVELS]].to_numpy()
    high = RISK_LEVELS.index("high")
    operating_point = json.loads((models / "operating_point.json").read_text(encoding="utf-8"))
    threshold = operating_point["threshold"]
    strict = operating_point.get("thresholds", {}).get("recall_0.95", float("nan"))
    summary = json.loads((processed / "preprocess.json").read_text(encoding="utf-8"))
    triage = triage_figures(y, probs[:, high], threshold, high_index=high)
    triage_95 = triage_figures(y, probs[:, high], strict, high_index=high)
    return {
        "high_risk_roc_auc": float(roc_auc_score(y == high, probs[:, high])),
        "high_risk_pr_auc": float(average_precision_score(y == high, probs[:, high])),
        "balanced_accuracy": _balanced_accuracy(y, called_levels(probs, level_prior(summary))),
        "balanced_accuracy_argmax": _balanced_accuracy(y, probs.argmax(axis=1)),
        "high_risk_recall": triage["high_risk_recall"],
        "specificity": triage["specificity"],
        "low_risk_spared": triage["low_risk_spared"],
        "high_risk_recall_95": triage_95["high_risk_recall"],
        "low_risk_spared_95": triage_95["low_risk_spared"],
        "ece": expected_calibration_error(y, probs / probs.sum(axis=1, keepdims=True)),
        "n_test": len(y),
        "n_high": int((y == high).sum()),
    }


def run_candidate(args: argparse.Namespace) -> None:
    import pandas as pd

    from tasks.ingest import import_dataset
    from tasks.params import load_params
    from tasks.stages.evaluate import evaluate
    from tasks.stages.preprocess import preprocess
    from tasks.stages.train import train

    params = load_params(args.params, args.set)
    raw, base = args.work / "raw", args.work / f"processed-{params.preprocess.image_size}"
    if not raw.exists():
        import_dataset(args.data, raw, progress=False)
    if not base.exists():
        preprocess(raw, base, params.preprocess)
    cases = pd.read_csv(base / "cases.csv")
    folds = fold_assignment(cases, args.folds, args.seed)
    out = args.work / args.candidate
    out.mkdir(parents=True, exist_ok=True)
    (out / "candidate.json").write_text(json.dumps({"overrides": args.set}, indent=2), encoding="utf-8")
    val_fraction = params.preprocess.val_fraction / (1 - 1 / args.folds)
    for fold in range(args.folds):
        done = out / f"fold-{fold}.json"
        if done.exists():
            continue
        processed = args.work / f"folds-{params.preprocess.image_size}" / f"fold-{fold}"
        processed.parent.mkdir(parents=True, exist_ok=True)
        write_fold(base, processed, cases, folds, fold, val_fraction, args.seed, params.preprocess.missing_clinical)
        started = time.perf_counter()
        print(f"== {args.candidate} fold {fold + 1}/{args.folds}", flush=True)
        work = out / f"fold-{fold}"
        result = train(processed, work / "models", work / "reports", params.train)
        evaluate(Path(result.model_path), processed, work / "reports", work / "models", params.evaluate)
        figures = {
            **fold_figures(work / "reports", work / "models", processed),
            "minutes": (time.perf_counter() - started) / 60,
            "processed": str(processed),
        }
        done.write_text(json.dumps(figures, indent=2), encoding="utf-8")
        print(json.dumps(figures), flush=True)
        shutil.rmtree(work / "models" / "checkpoints", ignore_errors=True)  # the saved model stays: --rescore


def rescore_candidate(args: argparse.Namespace) -> None:
    """Another candidate from a trained one without training again: its fold models' single view
    wrapped in other test-time views (``--views``) and with or without a temperature fitted on
    the inner validation part (``--no-temperature``), then evaluated as the pipeline does."""
    from tasks.dataset import load_split
    from tasks.model import inference_model, load_model, single_view
    from tasks.params import load_params
    from tasks.stages.evaluate import evaluate
    from tasks.stages.train import fit_temperature, view_probabilities

    params = load_params(args.params, args.set)
    source, out = args.work / args.rescore, args.work / args.candidate
    out.mkdir(parents=True, exist_ok=True)
    (out / "candidate.json").write_text(
        json.dumps({"from": args.rescore, "views": args.views, "temperature": not args.no_temperature}, indent=2),
        encoding="utf-8",
    )
    for fold in range(args.folds):
        done, trained = out / f"fold-{fold}.json", source / f"fold-{fold}" / "models" / "model.keras"
        if done.exists() or not trained.exists():
            continue
        processed = args.work / f"folds-{params.preprocess.image_size}" / f"fold-{fold}"
        started = time.perf_counter()
        base = single_view(load_model(trained))
        val = load_split(processed, "val")
        temperature = 1.0
        if not args.no_temperature:
            temperature = fit_temperature(view_probabilities(base, val, args.views), val.labels(params.train.target))
        work = out / f"fold-{fold}"
        (work / "models").mkdir(parents=True, exist_ok=True)
        inference_model(base, args.views, temperature).save(work / "models" / "model.keras")
        evaluate(work / "models" / "model.keras", processed, work / "reports", work / "models", params.evaluate)
        figures = {
            **fold_figures(work / "reports", work / "models", processed),
            "processed": str(processed),
            "minutes": json.loads((source / f"fold-{fold}.json").read_text(encoding="utf-8"))["minutes"],
            "rescore_minutes": (time.perf_counter() - started) / 60,
        }
        done.write_text(json.dumps(figures, indent=2), encoding="utf-8")
        print(json.dumps(figures), flush=True)


def _fold_result(work: Path, done: Path) -> dict:
    """A fold's figures, recomputed from its kept predictions where they are (so a fold measured
    before a change to the figures is read with today's definitions)."""
    result = json.loads(done.read_text(encoding="utf-8"))
    fold_dir = done.with_suffix("")
    processed = Path(result.get("processed", work / "folds-128" / fold_dir.name))
    if (fold_dir / "reports" / "predictions.csv").exists() and (processed / "preprocess.json").exists():
        result.update(fold_figures(fold_dir / "reports", fold_dir / "models", processed))
    return result


def table(work: Path, markdown: bool = False) -> str:
    """Mean ± standard deviation over folds, one row per candidate measured in ``work``."""
    labels = ["candidate", "folds", *(label for _, label in FIGURES), "train min/fold"]
    rows = []
    for candidate in sorted(p for p in work.iterdir() if (p / "candidate.json").exists()):
        results = [_fold_result(work, p) for p in sorted(candidate.glob("fold-*.json"))]
        if not results:
            continue
        cells = [candidate.name, str(len(results))]
        for key, _ in FIGURES:
            values = [r[key] for r in results]
            spread = statistics.stdev(values) if len(values) > 1 else float("nan")
            cells.append(f"{statistics.mean(values):.3f} ± {spread:.3f}")
        cells.append(f"{statistics.mean(r['minutes'] for r in results):.1f}")
        rows.append(cells)
    if markdown:
        lines = ["| " + " | ".join(labels) + " |", "|" + "---|" * len(labels)]
        return "\n".join([*lines, *("| " + " | ".join(cells) + " |" for cells in rows)])
    widths = [max(len(row[i]) for row in [labels, *rows]) + 2 for i in range(len(labels))]
    return "\n".join("".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in [labels, *rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidate", help="a name for the parameters measured (a folder of WORK)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--work", type=Path, default=Path("/tmp/skinrisk-cv"))
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0, help="fold assignment seed")
    parser.add_argument("--table", action="store_true", help="only print the table of what WORK holds")
    parser.add_argument("--markdown", action="store_true", help="the table in Markdown")
    parser.add_argument("--rescore", metavar="TRAINED", help="re-score the fold models of candidate TRAINED")
    parser.add_argument("--views", default="flips", choices=["none", "flips", "dihedral"], help="with --rescore")
    parser.add_argument("--no-temperature", action="store_true", help="with --rescore: temperature 1")
    args = parser.parse_args()
    if not args.table:
        if not args.candidate:
            parser.error("--candidate NAME is needed (or --table)")
        if args.rescore:
            rescore_candidate(args)
        else:
            run_candidate(args)
    print(table(args.work, markdown=args.markdown))


if __name__ == "__main__":
    main()
