"""The train stage: a frozen-backbone head phase, then fine-tuning of the top blocks.

Every epoch is checkpointed atomically under ``model_dir/checkpoints``: the latest weights, the
best weights so far and the per-epoch history. A training run that is killed resumes from its
last completed epoch (early-stopping state included) when started again with the same
parameters and data. The optimizer's moments are not checkpointed: Adam restarts them on resume.
Checkpoints are removed once the model is saved.
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
MONITOR = "val_balanced_accuracy"  # early stopping and best-epoch selection


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


class Checkpoints:
    """The resumable state of one training run, every file replaced atomically.

    Per phase: ``<phase>.latest.weights.h5`` and ``<phase>.state.json`` (last completed global
    epoch, best epoch and value), ``<phase>.best.weights.h5``, and ``<phase>.done.json`` once the
    phase has finished; ``history.csv`` holds one row per completed epoch.
    """

    def __init__(self, root: Path, fingerprint: str) -> None:
        self.root = root
        stamp = root / "fingerprint"
        if root.exists() and (not stamp.exists() or stamp.read_text() != fingerprint):
            print(f"discarding checkpoints in {root}: they belong to other parameters or data")
            shutil.rmtree(root)
        root.mkdir(parents=True, exist_ok=True)
        stamp.write_text(fingerprint)

    def _path(self, name: str) -> Path:
        return self.root / name

    def save_weights(self, model, name: str) -> None:
        tmp = self._path(f".{name}.tmp.weights.h5")  # Keras wants the .weights.h5 suffix
        model.save_weights(str(tmp))
        os.replace(tmp, self._path(name))

    def load_weights(self, model, name: str) -> None:
        model.load_weights(str(self._path(name)))

    def state(self, phase: str) -> dict | None:
        path = self._path(f"{phase}.state.json")
        return json.loads(path.read_text()) if path.exists() else None

    def save_state(self, phase: str, state: dict) -> None:
        write_json(self._path(f"{phase}.state.json"), state)

    def done(self, phase: str) -> dict | None:
        path = self._path(f"{phase}.done.json")
        return json.loads(path.read_text()) if path.exists() else None

    def mark_done(self, phase: str, model, last_epoch: int) -> None:
        self.save_weights(model, f"{phase}.weights.h5")
        write_json(self._path(f"{phase}.done.json"), {"last_epoch": last_epoch})

    def history(self) -> pd.DataFrame:
        path = self._path("history.csv")
        return pd.read_csv(path) if path.exists() else pd.DataFrame(columns=["epoch", "phase"])

    def record(self, row: dict) -> None:
        history = self.history()
        history = history.loc[history["epoch"] < row["epoch"]]  # an epoch redone after a kill
        history = pd.concat([history, pd.DataFrame([row])], ignore_index=True) if len(history) else pd.DataFrame([row])
        tmp = self._path(".history.csv.tmp")
        history.to_csv(tmp, index=False)
        os.replace(tmp, self._path("history.csv"))

    def truncate_history(self, last_epoch: int) -> None:
        """Forget epochs after the last checkpoint (the process died before saving them)."""
        history = self.history()
        if len(history) and history["epoch"].max() > last_epoch:
            history.loc[history["epoch"] <= last_epoch].to_csv(self._path("history.csv"), index=False)


def _resumable(phase: str, checkpoints: Checkpoints, patience: int, state: dict | None, validation):
    """A Keras callback: validation figures, early stopping, best weights and an atomic checkpoint.

    Replaces Keras' EarlyStopping and BackupAndRestore so that the early-stopping state survives
    a kill and no checkpoint file is ever half-written.
    """
    import keras

    class ResumableTraining(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.best = state["best"] if state else -np.inf
            self.best_epoch = state["best_epoch"] if state else 0

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            logs = logs if logs is not None else {}
            logs.update(validation())
            logs["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
            number = epoch + 1
            if logs[MONITOR] > self.best:
                self.best, self.best_epoch = float(logs[MONITOR]), number
                checkpoints.save_weights(self.model, f"{phase}.best.weights.h5")
            checkpoints.record({"epoch": number, "phase": phase, **{k: float(v) for k, v in logs.items()}})
            checkpoints.save_weights(self.model, f"{phase}.latest.weights.h5")
            checkpoints.save_state(phase, {"epoch": number, "best": self.best, "best_epoch": self.best_epoch})
            if number - self.best_epoch >= patience:
                print(
                    f"early stopping: no better {MONITOR} than {self.best:.4f} (epoch {self.best_epoch}) for {patience} epochs"
                )
                self.model.stop_training = True

    return ResumableTraining()


def _validation_figures(full_model, val: SplitArrays, val_inputs, target: str, summary: dict):
    """Risk-level figures on the validation split, computed with the full (image + clinical) model."""
    from sklearn.metrics import balanced_accuracy_score

    from tasks.metrics import risk_probabilities

    high = summary["risk_levels"].index("high")
    labels = val.labels(target)

    def compute() -> dict[str, float]:
        probs = full_model.predict(val_inputs, verbose=0)
        picked = np.clip(probs[np.arange(len(labels)), labels], 1e-7, 1.0)
        predicted = risk_probabilities(probs, target, summary["diagnoses"], summary["risk_map"]).argmax(axis=1)
        is_high = val.risk == high
        return {
            "val_loss": float(-np.log(picked).mean()),
            "val_accuracy": float((probs.argmax(axis=1) == labels).mean()),
            MONITOR: float(balanced_accuracy_score(val.risk, predicted)),
            "val_high_risk_recall": float((predicted[is_high] == high).mean()) if is_high.any() else 0.0,
        }

    return compute


def _compile(model, learning_rate: float, params: TrainParams, n_classes: int) -> None:
    import keras

    from tasks.distribution import strategy_scope
    from tasks.model import sparse_focal_loss

    loss = (
        sparse_focal_loss(params.focal_gamma, n_classes)
        if params.loss == "focal"
        else keras.losses.SparseCategoricalCrossentropy()
    )
    with strategy_scope(params.distribution):
        model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=loss, metrics=["accuracy"])


def _smote_head_data(model, train: SplitArrays, labels: np.ndarray, params: TrainParams):
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

    from tasks.distribution import strategy_scope
    from tasks.model import build_model, head_of, set_finetune

    started = time.perf_counter()
    processed_dir, model_dir, reports_dir = Path(processed_dir), Path(model_dir), Path(reports_dir)
    summary = read_preprocess_summary(processed_dir)
    train_split, val = load_split(processed_dir, "train"), load_split(processed_dir, "val")
    target = params.target
    class_names = summary["risk_levels"] if target == "risk" else summary["diagnoses"]
    n_classes = len(class_names)
    labels = train_split.labels(target)

    checkpoints = Checkpoints(model_dir / "checkpoints", _fingerprint(params, processed_dir))
    keras.utils.set_random_seed(params.seed)
    scope = strategy_scope(params.distribution)  # variables live on every replica when mirrored
    with scope:
        model = build_model(summary["image_size"], train_split.clinical.shape[1], n_classes, params)
    weights = class_weights(labels, n_classes) if params.class_weights else None
    val_inputs = make_dataset(val, val.labels(target), batch_size=64, training=False).map(lambda x, y: x)
    validation = _validation_figures(model, val, val_inputs, target, summary)
    verbose = 1 if sys.stdout.isatty() else 2
    steps = params.steps_per_epoch or None
    resumed_from = 0

    def run_phase(phase: str, fit_model, data, first_epoch: int, n_epochs: int, cw) -> int:
        """Train one phase (resuming it if a checkpoint exists); returns its last global epoch."""
        nonlocal resumed_from
        state = checkpoints.state(phase)
        initial = first_epoch
        if state is not None:
            checkpoints.load_weights(fit_model, f"{phase}.latest.weights.h5")
            checkpoints.truncate_history(state["epoch"])
            initial = resumed_from = state["epoch"]
            print(f"resuming training from the checkpoint of epoch {initial} in {checkpoints.root}")
        stopped = state is not None and state["epoch"] - state["best_epoch"] >= params.early_stopping_patience
        if not stopped and initial < first_epoch + n_epochs:
            fit_model.fit(
                data,
                epochs=first_epoch + n_epochs,
                initial_epoch=initial,
                steps_per_epoch=steps,
                class_weight=cw,
                callbacks=[_resumable(phase, checkpoints, params.early_stopping_patience, state, validation)]
                + ([_epoch_logger(run_id)] if run_id else []),
                verbose=verbose,
                shuffle=False,  # the dataset reshuffles itself each epoch
            )
        final = checkpoints.state(phase)
        if final is None:
            return first_epoch
        checkpoints.load_weights(fit_model, f"{phase}.best.weights.h5")  # the best epoch, not the last
        # The whole model, not just what this phase fitted: a SMOTE head phase fits the head alone,
        # and both resuming after it and falling back to it need the backbone as it was too.
        checkpoints.mark_done(phase, model, final["epoch"])
        return final["epoch"]

    def train_data():
        data = make_dataset(
            train_split, labels, batch_size=params.batch_size, training=True, augment=params.augment, seed=params.seed
        )
        return data.repeat() if steps else data

    # Phase 1: the head on a frozen backbone.
    head_done = checkpoints.done("head")
    if head_done is not None:
        checkpoints.load_weights(model, "head.weights.h5")
        head_last = head_done["last_epoch"]
        resumed_from = head_last
        print(f"resuming training after the finished head phase (epoch {head_last}) in {checkpoints.root}")
    elif params.head_epochs and params.smote:
        head = head_of(model)  # its layers are the model's: validation still scores the full model
        _compile(head, params.learning_rate, params, n_classes)
        features, smote_labels = _smote_head_data(model, train_split, labels, params)
        data = tf.data.Dataset.from_tensor_slices((features, smote_labels))
        data = data.shuffle(len(smote_labels), seed=params.seed).batch(params.batch_size)
        head_last = run_phase("head", head, data, 0, params.head_epochs, None)
    elif params.head_epochs:
        _compile(model, params.learning_rate, params, n_classes)
        head_last = run_phase("head", model, train_data(), 0, params.head_epochs, weights)
    else:
        head_last = 0

    # Phase 2: fine-tune the top blocks at a lower rate.
    if params.finetune_epochs:
        set_finetune(model, params.finetune_from_block)
        _compile(model, params.finetune_learning_rate, params, n_classes)
        run_phase("finetune", model, train_data(), head_last, params.finetune_epochs, weights)
        head, finetune = checkpoints.state("head"), checkpoints.state("finetune")
        if head and finetune and finetune["best"] <= head["best"]:
            # Fine-tuning never beat the head phase on validation: keep the better model.
            print(
                f"fine-tuning peaked at {MONITOR} {finetune['best']:.4f}, not above {head['best']:.4f} after "
                "the head phase: keeping the head-phase weights"
            )
            checkpoints.load_weights(model, "head.weights.h5")

    history = checkpoints.history().sort_values("epoch")
    model_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=model_dir, prefix=".model-") as staging:
        staged = Path(staging) / MODEL_FILE  # Keras insists on the .keras suffix
        model.save(staged)
        os.replace(staged, model_dir / MODEL_FILE)
    reports_dir.mkdir(parents=True, exist_ok=True)
    history_path = reports_dir / HISTORY_FILE
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


def _epoch_logger(run_id: str):
    from tasks.tracking import epoch_logger

    return epoch_logger(run_id)
