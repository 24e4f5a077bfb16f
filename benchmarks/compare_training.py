"""Training choices compared on real data: the target (risk levels or diagnoses) and the answer to
the class imbalance (class-weighted cross-entropy, focal loss, SMOTE on the head's inputs).

The data is imported and preprocessed once; every variant then trains with params.yaml plus its
own overrides (same seed, same splits) and is scored on the same test split, with the triage
threshold chosen on validation. Prints one row per variant and writes them to WORK/compare.json.
A variant whose figures are already in WORK is not trained again (rerun to resume).

    .venv/bin/python benchmarks/compare_training.py [--data ../shared/data/ham10000-200px]
        [--work /tmp/skinrisk-compare] [--variants ce-weights smote ...] [--set k=v ...]

One seed per variant: differences inside the bootstrap intervals printed are not evidence.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ham10000-200px"
VARIANTS: dict[str, list[str]] = {
    "ce-weights": ["train.smote=false"],  # 3 risk levels, class-weighted cross-entropy throughout
    "dx-target": ["train.target=dx", "train.smote=false"],
    "focal": ["train.loss=focal", "train.smote=false"],
    "smote": ["train.smote=true"],  # the default since this comparison
    # the diagnoses again, without the 40x class weights of df and vasc
    "dx-smote": ["train.target=dx", "train.smote=true", "train.class_weights=false"],
    "dx-unweighted": ["train.target=dx", "train.smote=false", "train.class_weights=false"],
}


def run_variant(name: str, overrides: list[str], args: argparse.Namespace, processed: Path) -> dict:
    from tasks.evaluate import evaluate, headline_figures
    from tasks.params import load_params
    from tasks.train import train

    out = args.work / name
    done = out / "figures.json"
    if done.exists():
        return json.loads(done.read_text(encoding="utf-8"))
    params = load_params(args.params, [*args.set, *overrides])
    started = time.perf_counter()
    result = train(processed, out / "models", out / "reports", params.train)
    metrics = evaluate(Path(result.model_path), processed, out / "reports", out / "models", params.evaluate)
    figures = {
        "variant": name,
        "overrides": overrides,
        **headline_figures(metrics),
        "balanced_accuracy_ci95": metrics.get("balanced_accuracy_ci95"),
        "high_risk_recall_ci95": (metrics.get("triage") or {}).get("high_risk_recall_ci95"),
        "best_val_balanced_accuracy": result.best_val_balanced_accuracy,
        "epochs": result.epochs_run,
        "minutes": round((time.perf_counter() - started) / 60, 1),
    }
    done.write_text(json.dumps(figures, indent=2), encoding="utf-8")
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--work", type=Path, default=Path("/tmp/skinrisk-compare"))
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = parser.parse_args()

    from tasks.ingest import import_dataset
    from tasks.params import load_params
    from tasks.preprocess import preprocess

    params = load_params(args.params, args.set)
    raw, processed = args.work / "raw", args.work / "processed"
    if not raw.exists():
        import_dataset(args.data, raw, progress=False)
    if not processed.exists():
        preprocess(raw, processed, params.preprocess)
    rows = []
    for name in args.variants:
        print(f"== {name}: {' '.join(VARIANTS[name]) or 'params.yaml as it is'}", flush=True)
        rows.append(run_variant(name, VARIANTS[name], args, processed))
        (args.work / "compare.json").write_text(json.dumps(rows, indent=2), encoding="utf-8")

    def ci(pair) -> str:
        return f"({pair[0]:.3f}-{pair[1]:.3f})" if pair and None not in pair else ""

    print(
        f"\n{'variant':<15}{'test BA (95% CI)':<26}{'high recall@op (CI)':<26}{'spec':>6}{'F1':>7}{'AUC':>7}"
        f"{'ECE':>7}{'val BA':>8}{'epochs':>7}{'min':>6}"
    )
    for row in rows:
        print(
            f"{row['variant']:<15}"
            f"{row['balanced_accuracy']:.3f} {ci(row['balanced_accuracy_ci95']):<20}"
            f"{row['high_risk_recall']:.3f} {ci(row['high_risk_recall_ci95']):<20}"
            f"{row['specificity']:>6.3f}{row['macro_f1']:>7.3f}{row['roc_auc_ovr']:>7.3f}{row['ece']:>7.3f}"
            f"{row['best_val_balanced_accuracy']:>8.3f}{row['epochs']:>7}{row['minutes']:>6.1f}"
        )


if __name__ == "__main__":
    main()
