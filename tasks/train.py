"""The train stage: a frozen-backbone head phase, then fine-tuning of the top blocks.

Every epoch is checkpointed (Keras ``BackupAndRestore``) under ``model_dir/checkpoints``; a
training run that is killed resumes from its last completed epoch when started again with the
same parameters and data. Checkpoints are removed once the model is saved.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from tasks.atomic import write_json
from tasks.dataset import SplitArrays, load_split, make_dataset
from tasks.errors import DataError
from tasks.params import TrainParams
from tasks.preprocess import read_preprocess_summary

MODEL_FILE = "model.keras"
TRAIN_INFO_FILE = "train.json"
HISTORY_FILE = "training_history.csv"
MONITOR = "val_balanced_accuracy"


@dataclass(frozen=True)
class TrainResult:
    model_path: str
    history_path: str
    run_id: str | None
    target: str
    class_names: list[str]
    epochs_run: int
    best_val_balanced_accuracy: float
    seconds: float
    resumed_from_epoch: int


def class_weights(labels: np.ndarray, n_classes: int) -> dict[int, float]:
    """Balanced weights n / (k * count_c); absent classes get weight 1."""
    counts = np.bincount(labels, minlength=n_classes)
    return {c: (len(labels) / (n_classes * counts[c]) if counts[c] else 1.0) for c in range(n_classes)}


def _fingerprint(params: TrainParams, processed_dir: Path) -> str:
    summary = (Path(processed_dir) / "preprocess.json").read_bytes()
    return hashlib.sha256(params.model_dump_json().encode() + summary).hexdigest()[:16]


class _Checkpoints:
    """The resumable state of one training run: per-phase backups, history and phase markers."""

    def __init__(self, root: Path, fingerprint: str) -> None:
        self.root = root
        stamp = root / "fingerprint"
        if root.exists() and (not stamp.exists() or stamp.read_text() != fingerprint):
            print(f"discarding checkpoints in {root}: they belong to other parameters or data")
            shutil.rmtree(root)
        root.mkdir(parents=True, exist_ok=True)
        stamp.write_text(fingerprint)

    @property
    def resuming(self) -> bool:
        return (self.root / "history.csv").exists()

    def backup_dir(self, phase: str) -> str:
        return str(self.root / f"backup_{phase}")

    def phase_done(self, phase: str) -> dict | None:
        marker = self.root / f"{phase}.done.json"
        return json.loads(marker.read_text()) if marker.exists() else None

    def mark_done(self, phase: str, model, epochs_done: int) -> None:
        model.save_weights(str(self.root / f"{phase}.weights.h5"))
        write_json(self.root / f"{phase}.done.json", {"epochs_done": epochs_done})

    def restore_phase(self, phase: str, model) -> None:
        model.load_weights(str(self.root / f"{phase}.weights.h5"))

    def history(self) -> pd.DataFrame:
        path = self.root / "history.csv"
        return pd.read_csv(path) if path.exists() else pd.DataFrame()

    def record(self, row: dict) -> None:
        history = self.history()
        if not history.empty:
            history = history.loc[history["epoch"] != row["epoch"]]  # an epoch redone after a kill
        history = pd.concat([history, pd.DataFrame([row])], ignore_index=True)
        tmp = self.root / "history.csv.tmp"
        history.to_csv(tmp, index=False)
        os.replace(tmp, self.root / "history.csv")


def _callbacks(
    *,
    phase: str,
    val: SplitArrays,
    val_inputs,
    target: str,
    summary: dict,
    params: TrainParams,
    checkpoints: _Checkpoints,
    run_id: str | None,
    full_model,
):
    import keras
    from sklearn.metrics import balanced_accuracy_score

    from tasks.metrics import risk_probabilities

    high = summary["risk_levels"].index("high")

    class ValidationMetrics(keras.callbacks.Callback):
        """Risk-level validation figures each epoch, for early stopping and the curves."""

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            logs = logs if logs is not None else {}
            probs = full_model.predict(val_inputs, verbose=0)
            labels = val.labels(target)
            picked = np.clip(probs[np.arange(len(labels)), labels], 1e-7, 1.0)
            risk_probs = risk_probabilities(probs, target, summary["diagnoses"], summary["risk_map"])
            predicted = risk_probs.argmax(axis=1)
            logs["val_loss"] = float(-np.log(picked).mean())
            logs["val_accuracy"] = float((probs.argmax(axis=1) == labels).mean())
            logs[MONITOR] = float(balanced_accuracy_score(val.risk, predicted))
            is_high = val.risk == high
            logs["val_high_risk_recall"] = float((predicted[is_high] == high).mean()) if is_high.any() else 0.0
            logs["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
            checkpoints.record({"epoch": epoch + 1, "phase": phase, **logs})

    callbacks = [
        ValidationMetrics(),
        keras.callbacks.EarlyStopping(
            monitor=MONITOR,
            mode="max",
            patience=params.early_stopping_patience,
            restore_best_weights=True,
        ),
        keras.callbacks.BackupAndRestore(checkpoints.backup_dir(phase), save_freq="epoch", delete_checkpoint=True),
    ]
    if run_id:
        from tasks.tracking import epoch_logger

        callbacks.append(epoch_logger(run_id))
    return callbacks


def _compile(model, learning_rate: float, params: TrainParams, n_classes: int) -> None:
    import keras

    from tasks.model import sparse_focal_loss

    loss = (
        sparse_focal_loss(params.focal_gamma, n_classes)
        if params.loss == "focal"
        else keras.losses.SparseCategoricalCrossentropy()
    )
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=loss, metrics=["accuracy"])


def _smote_head_data(model, train: SplitArrays, labels: np.ndarray, params: TrainParams, batch_size: int):
    """Frozen image embeddings plus clinical features, oversampled with SMOTE."""
    from imblearn.over_sampling import SMOTE

    from tasks.images import normalize_for_mobilenet
    from tasks.model import embedding_model

    embed = embedding_model(model)
    embeddings = np.concatenate(
        [
            embed.predict(normalize_for_mobilenet(train.images[s : s + 256]), verbose=0)
            for s in range(0, len(train), 256)
        ]
    )
    features = np.concatenate([embeddings, train.clinical], axis=1)
    smallest = int(np.bincount(labels).min())
    if smallest < 2:
        raise DataError("SMOTE needs at least 2 training images of every class; set train.smote=false")
    smote = SMOTE(random_state=params.seed, k_neighbors=min(5, smallest - 1))
    resampled, resampled_labels = smote.fit_resample(features, labels)
    width = embeddings.shape[1]
    return (resampled[:, :width], resampled[:, width:]), resampled_labels


def train(
    processed_dir: Path,
    model_dir: Path,
    reports_dir: Path,
    params: TrainParams,
    *,
    run_id: str | None = None,
) -> TrainResult:
    """Train the fused model on ``processed_dir`` and save it to ``model_dir/model.keras``."""
    import keras
    import tensorflow as tf

    from tasks.model import build_model, head_of, set_finetune

    started = time.perf_counter()
    processed_dir, model_dir, reports_dir = Path(processed_dir), Path(model_dir), Path(reports_dir)
    summary = read_preprocess_summary(processed_dir)
    train_split, val = load_split(processed_dir, "train"), load_split(processed_dir, "val")
    target = params.target
    class_names = summary["risk_levels"] if target == "risk" else summary["diagnoses"]
    n_classes = len(class_names)
    labels = train_split.labels(target)

    checkpoints = _Checkpoints(model_dir / "checkpoints", _fingerprint(params, processed_dir))
    resumed_from = int(checkpoints.history()["epoch"].max()) if checkpoints.resuming else 0
    if resumed_from:
        print(f"resuming training from the checkpoint of epoch {resumed_from} in {checkpoints.root}")

    keras.utils.set_random_seed(params.seed)
    model = build_model(summary["image_size"], train_split.clinical.shape[1], n_classes, params)
    weights = class_weights(labels, n_classes) if params.class_weights else None
    val_inputs = make_dataset(val, val.labels(target), batch_size=64, training=False)
    val_inputs = val_inputs.map(lambda x, y: x)
    verbose = 1 if sys.stdout.isatty() else 2
    common = dict(
        val=val,
        val_inputs=val_inputs,
        target=target,
        summary=summary,
        params=params,
        checkpoints=checkpoints,
        run_id=run_id,
        full_model=model,
    )

    def fit(fit_model, data, phase: str, initial_epoch: int, epochs: int, steps: int | None, cw):
        fit_model.fit(
            data,
            epochs=initial_epoch + epochs,
            initial_epoch=initial_epoch,
            steps_per_epoch=steps,
            class_weight=cw,
            callbacks=_callbacks(phase=phase, **common),
            verbose=verbose,
            shuffle=False,  # the dataset reshuffles itself each epoch
        )
        return len(checkpoints.history().query("phase == @phase"))

    steps = params.steps_per_epoch or None

    def train_data():
        data = make_dataset(
            train_split,
            labels,
            batch_size=params.batch_size,
            training=True,
            augment=params.augment,
            seed=params.seed,
        )
        return data.repeat() if steps else data

    # Phase 1: the head on a frozen backbone.
    head_done = checkpoints.phase_done("head")
    if head_done is not None:
        checkpoints.restore_phase("head", model)
        head_epochs = head_done["epochs_done"]
    elif params.head_epochs:
        _compile(model, params.learning_rate, params, n_classes)
        if params.smote:
            head = head_of(model)
            _compile(head, params.learning_rate, params, n_classes)
            features, smote_labels = _smote_head_data(model, train_split, labels, params, params.batch_size)
            data = (
                tf.data.Dataset.from_tensor_slices((features, smote_labels))
                .shuffle(len(smote_labels), seed=params.seed)
                .batch(params.batch_size)
            )
            # The head's layers are the full model's, so validation still scores the full model.
            head_epochs = fit(head, data, "head", 0, params.head_epochs, None, None)
        else:
            head_epochs = fit(model, train_data(), "head", 0, params.head_epochs, steps, weights)
        checkpoints.mark_done("head", model, head_epochs)
    else:
        head_epochs = 0

    # Phase 2: fine-tune the top blocks at a lower rate.
    if params.finetune_epochs:
        set_finetune(model, params.finetune_from_block)
        _compile(model, params.finetune_learning_rate, params, n_classes)
        fit(model, train_data(), "finetune", head_epochs, params.finetune_epochs, steps, weights)

    history = checkpoints.history()
    model_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=model_dir, prefix=".model-") as staging:
        staged = Path(staging) / MODEL_FILE  # Keras insists on the .keras suffix
        model.save(staged)
        os.replace(staged, model_dir / MODEL_FILE)
    history_path = reports_dir / HISTORY_FILE
    reports_dir.mkdir(parents=True, exist_ok=True)
    history.to_csv(history_path.with_suffix(".tmp"), index=False)
    os.replace(history_path.with_suffix(".tmp"), history_path)

    result = TrainResult(
        model_path=str(model_dir / MODEL_FILE),
        history_path=str(history_path),
        run_id=run_id,
        target=target,
        class_names=list(class_names),
        epochs_run=len(history),
        best_val_balanced_accuracy=float(history[MONITOR].max()) if len(history) else float("nan"),
        seconds=round(time.perf_counter() - started, 1),
        resumed_from_epoch=resumed_from,
    )
    write_json(model_dir / TRAIN_INFO_FILE, asdict(result))
    shutil.rmtree(checkpoints.root, ignore_errors=True)
    return result
