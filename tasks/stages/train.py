"""The train stage: a frozen-backbone head phase, fine-tuning, then temperature scaling.

The recipe (chosen by lesion-grouped cross-validation on real data: benchmarks/cv_quality.py,
README "Training choices"): the head learns on a frozen ImageNet backbone; then the blocks from
``finetune_from_block`` on are fine-tuned (BatchNorm kept in inference mode) with the rate
cosine-decayed per epoch; class weights are the balanced weights to ``class_weight_power``
(full balanced weights distort the probabilities); with ``target: risk`` an auxiliary softmax
over the 7 diagnoses shares the loss (``aux_dx_weight``). The best epoch is chosen on
``monitor`` (validation loss by default: on ~1,000 validation images it moves far less than
balanced accuracy on ~200 minority cases). Finally a softmax temperature is fitted on the
validation split over the test-time views, and the saved model is the single-view model inside
those views and that temperature (``tasks.model.inference_model``).

Every epoch is checkpointed atomically under ``model_dir/checkpoints``: the latest weights, the
best weights so far and the per-epoch history. A training run that is killed resumes from its
last completed epoch (early-stopping state included) when started again with the same
parameters and data. The optimizer's moments are not checkpointed: Adam restarts them on resume.
Checkpoints are removed once the model is saved.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from tasks.atomic import atomic_path, write_json
from tasks.dataset import SplitArrays, load_split, make_dataset
from tasks.errors import SkinriskError
from tasks.params import TrainParams
from tasks.paths import TRAIN_INFO_FILE
from tasks.schema import PROCESSED_SUMMARY_FILE, PreprocessSummary, read_preprocess_summary

MODEL_FILE = "model.keras"
HISTORY_FILE = "training_history.csv"
# Validation figures where lower is better; the others (AUC, balanced accuracy) are maximised.
LOWER_IS_BETTER = ("val_loss",)


@dataclass(frozen=True)
class TrainResult:
    model_path: str
    history_path: str
    run_id: str | None
    target: str
    class_names: list[str]
    epochs_run: int
    monitor: str
    best_epoch: int
    best_value: float
    temperature: float
    tta: str
    calibration: dict  # validation log loss and ECE before and after the temperature
    seconds: float
    resumed_from_epoch: int


def class_weights(labels: np.ndarray, n_classes: int, power: float = 1.0) -> dict[int, float]:
    """scikit-learn's balanced weights ``n / (k * count_c)`` to ``power``; absent classes get 1."""
    from sklearn.utils.class_weight import compute_class_weight

    present = np.unique(labels)
    balanced = compute_class_weight("balanced", classes=present, y=labels)
    # scikit-learn divides by the classes present; the model has n_classes outputs
    balanced = balanced * len(present) / n_classes
    weights = dict.fromkeys(range(n_classes), 1.0)
    weights.update({int(c): float(w) ** power for c, w in zip(present, balanced, strict=True)})
    return weights


def _fingerprint(params: TrainParams, processed_dir: Path) -> str:
    summary = (Path(processed_dir) / PROCESSED_SUMMARY_FILE).read_bytes()
    return hashlib.sha256(params.model_dump_json().encode() + summary).hexdigest()[:16]


class Checkpoints:
    """The resumable state of one training run, every file replaced atomically.

    Per phase: ``<phase>.latest.weights.h5`` and ``<phase>.state.json`` (last completed global
    epoch, best epoch and value), ``<phase>.best.weights.h5``, and ``<phase>.done.json`` once the
    phase has finished; ``history.csv`` holds one row per completed epoch.

    Not Keras' ``BackupAndRestore``: it resumes one ``fit`` call and deletes its backup when that
    call ends, while a run here is two ``fit`` calls on differently frozen models (head, then
    fine-tuning) whose best epoch (by a validation figure Keras does not compute) must survive
    between them, and whose checkpoints must be thrown away when params or data change
    (the fingerprint). Writing the backups with ``BackupAndRestore`` would still need all of this.
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
        with atomic_path(self._path(name)) as tmp:
            model.save_weights(str(tmp))

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
        with atomic_path(self._path("history.csv")) as tmp:
            history.to_csv(tmp, index=False)

    def truncate_history(self, last_epoch: int) -> None:
        """Forget epochs after the last checkpoint (the process died before saving them)."""
        history = self.history()
        if len(history) and history["epoch"].max() > last_epoch:
            with atomic_path(self._path("history.csv")) as tmp:
                history.loc[history["epoch"] <= last_epoch].to_csv(tmp, index=False)


def _improved(monitor: str, value: float, best: float) -> bool:
    """Whether ``value`` of ``monitor`` beats ``best``; an undefined (NaN) value never does."""
    if np.isnan(value):
        return False
    return value < best if monitor in LOWER_IS_BETTER else value > best


def _check_monitor(monitor: str, val_is_high: np.ndarray) -> None:
    """Refuse a monitor the validation split leaves undefined: NaN every epoch, no epoch would be best."""
    n_high = int(np.sum(val_is_high))
    if monitor == "val_high_risk_auc" and not 0 < n_high < len(val_is_high):
        raise SkinriskError(
            f"train.monitor is val_high_risk_auc but {n_high} of the {len(val_is_high)} validation images are "
            "high-risk, so the AUC is undefined: set train.monitor to val_loss or val_balanced_accuracy"
        )


def _worst(monitor: str) -> float:
    return np.inf if monitor in LOWER_IS_BETTER else -np.inf


def _resumable(phase: str, checkpoints: Checkpoints, params: TrainParams, state: dict | None, validation):
    """A Keras callback: validation figures, early stopping, best weights and an atomic checkpoint.

    Replaces Keras' EarlyStopping and BackupAndRestore so that the early-stopping state survives
    a kill and no checkpoint file is ever half-written.
    """
    import keras

    monitor, patience = params.monitor, params.early_stopping_patience

    class ResumableTraining(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.best = state["best"] if state else _worst(monitor)
            self.best_epoch = state["best_epoch"] if state else 0

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            logs = logs if logs is not None else {}
            logs.update(validation())
            logs["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
            number = epoch + 1
            if _improved(monitor, logs[monitor], self.best):
                self.best, self.best_epoch = float(logs[monitor]), number
                checkpoints.save_weights(self.model, f"{phase}.best.weights.h5")
            print(epoch_line(number, params.head_epochs + params.finetune_epochs, phase, logs), flush=True)
            checkpoints.record({"epoch": number, "phase": phase, **{k: float(v) for k, v in logs.items()}})
            checkpoints.save_weights(self.model, f"{phase}.latest.weights.h5")
            checkpoints.save_state(phase, {"epoch": number, "best": self.best, "best_epoch": self.best_epoch})
            if number - self.best_epoch >= patience:
                print(
                    f"early stopping: no better {monitor} than {self.best:.4f} (epoch {self.best_epoch}) for {patience} epochs"
                )
                self.model.stop_training = True

    return ResumableTraining()


def epoch_line(number: int, total: int, phase: str, logs: dict) -> str:
    """One line per epoch, printed: on the console, in logs/skinrisk.log and, through the flow's
    ``log_prints``, in the Prefect flow-run logs (Keras writes its progress bar to stdout directly,
    which Prefect does not capture)."""

    def figure(key: str) -> str:
        value = logs.get(key)
        return "n/a" if value is None or np.isnan(value) else f"{value:.4f}"

    return (
        f"epoch {number}/{total} ({phase}): loss {figure('loss')}, val_loss {figure('val_loss')}, "
        f"val high-risk AUC {figure('val_high_risk_auc')}, val balanced accuracy {figure('val_balanced_accuracy')}, "
        f"rate {logs.get('learning_rate', float('nan')):.2e}"
    )


def _validation_figures(served, val: SplitArrays, val_inputs, target: str, summary: PreprocessSummary):
    """Single-view validation figures of the served output, once per epoch.

    ``val_loss`` is the log loss of the training target; the others are on risk levels.
    """
    from sklearn.metrics import balanced_accuracy_score

    from tasks.decision import called_levels, level_prior
    from tasks.metrics import class_recall, high_risk_auc, risk_probabilities

    high = summary.risk_levels.index("high")
    prior = level_prior(summary)
    labels = val.labels(target)
    is_high = val.risk == high

    def compute() -> dict[str, float]:
        probs = served.predict(val_inputs, verbose=0)
        picked = np.clip(probs[np.arange(len(labels)), labels], 1e-7, 1.0)
        risk = risk_probabilities(probs, target, summary.diagnoses, summary.risk_map)
        predicted = called_levels(risk, prior)
        return {
            "val_loss": float(-np.log(picked).mean()),
            "val_accuracy": float((probs.argmax(axis=1) == labels).mean()),
            "val_balanced_accuracy": float(balanced_accuracy_score(val.risk, predicted)),
            # NaN where undefined, as in tasks.metrics (MLflow logging skips NaN)
            "val_high_risk_auc": high_risk_auc(is_high, risk[:, high]),
            "val_high_risk_recall": class_recall(high)(val.risk, predicted),
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
        optimizer = keras.optimizers.Adam(
            learning_rate, use_ema=params.ema_momentum > 0, ema_momentum=params.ema_momentum or 0.99
        )
        if len(model.outputs) > 1:  # the auxiliary diagnosis head
            model.compile(
                optimizer=optimizer,
                loss=[loss, keras.losses.SparseCategoricalCrossentropy()],
                loss_weights=[1.0, params.aux_dx_weight],
            )
        else:
            model.compile(optimizer=optimizer, loss=loss, metrics=["accuracy"])


def _finetune_schedule(first_epoch: int, params: TrainParams, batches_per_epoch: int) -> list:
    """Keras callbacks setting fine-tuning's rate: per epoch (cosine-decayed to 0 over the phase,
    or constant) and, over the first ``finetune_warmup_epochs``, a linear warm-up per batch.

    The warm-up keeps a fresh Adam from tearing the pretrained blocks apart in its first steps: on
    the real sample at 3e-4 without it, fine-tuning from block 9 once jumped from training loss
    1.01 to 1.41 in its first epoch and never recovered (validation high-risk AUC 0.83 -> 0.66).
    Both are keyed on the global epoch, so a resumed run continues the same schedule.
    """
    import math

    import keras

    rate, n_epochs, warmup = params.finetune_learning_rate, params.finetune_epochs, params.finetune_warmup_epochs

    def epoch_rate(epoch: int) -> float:
        if params.finetune_schedule == "constant":
            return rate
        return rate * 0.5 * (1 + math.cos(math.pi * (epoch - first_epoch) / n_epochs))

    class FinetuneRate(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch: int, logs=None) -> None:
            self.epoch = epoch
            self.model.optimizer.learning_rate = epoch_rate(epoch)

        def on_train_batch_begin(self, batch: int, logs=None) -> None:
            done = self.epoch - first_epoch
            if done < warmup:
                share = (done * batches_per_epoch + batch + 1) / (warmup * batches_per_epoch)
                self.model.optimizer.learning_rate = epoch_rate(self.epoch) * share

        def on_epoch_end(self, epoch: int, logs=None) -> None:
            self.model.optimizer.learning_rate = epoch_rate(epoch)  # what the history records

    callback = FinetuneRate()
    callback.epoch_rate = epoch_rate
    return [callback]


def view_probabilities(base, split: SplitArrays, views: str, batch_size: int = 64) -> np.ndarray:
    """Single-view probabilities of ``base`` on every test-time view of ``split``: V x N x K."""
    from tasks.images import normalize_for_mobilenet
    from tasks.model import TTA_VIEWS, stacked_view_model

    n_views = TTA_VIEWS[views]
    stacked = stacked_view_model(base, views)
    blocks = []
    for s in range(0, len(split), batch_size):
        images, clinical = split.images[s : s + batch_size], split.clinical[s : s + batch_size]
        # One predict batch per chunk: predict's own batching would interleave the views of
        # different batches, and the reshape below would pair views of different images.
        probs = stacked.predict([normalize_for_mobilenet(images), clinical], batch_size=len(images), verbose=0)
        blocks.append(probs.reshape(n_views, len(images), probs.shape[-1]))
    return np.concatenate(blocks, axis=1)


def calibrated(view_probs: np.ndarray, temperature: float) -> np.ndarray:
    """What the saved model computes from its views: the mean over views of softmax(log p / T)."""
    logits = np.log(np.clip(view_probs.astype(np.float64), 1e-12, 1.0)) / temperature
    logits -= logits.max(axis=-1, keepdims=True)
    scaled = np.exp(logits)
    return (scaled / scaled.sum(axis=-1, keepdims=True)).mean(axis=0)


def fit_temperature(view_probs: np.ndarray, labels: np.ndarray) -> float:
    """The temperature minimising the validation log loss of :func:`calibrated` (Guo et al., 2017).

    scikit-learn's ``CalibratedClassifierCV(method="temperature")`` fits the same scalar, but
    around a scikit-learn estimator; here it has to live inside the Keras model.

    When every validation case is already called right, the log loss only falls as the
    temperature falls: the fit would run to its lower bound (0.07-0.12 on the synthetic sample)
    and make the model near-certain on new cases. Nothing can be learnt from such a split, so the
    temperature stays 1 (:func:`temperature_is_identifiable`).
    """
    from scipy.optimize import minimize_scalar

    if not temperature_is_identifiable(view_probs, labels):
        return 1.0
    rows = np.arange(len(labels))

    def nll(log_t: float) -> float:
        return float(-np.log(np.clip(calibrated(view_probs, np.exp(log_t))[rows, labels], 1e-12, 1.0)).mean())

    best = minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method="bounded")
    return float(np.exp(best.x))


def temperature_is_identifiable(view_probs: np.ndarray, labels: np.ndarray) -> bool:
    """Whether the validation split bounds the temperature from below: some case is called wrong
    by the view-averaged probabilities (with none, the log loss falls as the temperature does)."""
    return bool((calibrated(view_probs, 1.0).argmax(axis=-1) != labels).any())


def _calibration_figures(view_probs: np.ndarray, labels: np.ndarray, temperature: float) -> dict[str, float]:
    from tasks.metrics import expected_calibration_error

    rows = np.arange(len(labels))
    figures = {}
    for name, t in (("before", 1.0), ("after", temperature)):
        probs = calibrated(view_probs, t)
        figures[f"val_log_loss_{name}"] = (
            float(-np.log(np.clip(probs[rows, labels], 1e-12, 1.0)).mean()) + 0.0
        )  # no -0.0
        figures[f"val_ece_{name}"] = expected_calibration_error(labels, probs)
    return figures


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

    from tasks.distribution import strategy_scope
    from tasks.model import build_model, inference_model, served_output, set_finetune

    started = time.perf_counter()
    processed_dir, model_dir, reports_dir = Path(processed_dir), Path(model_dir), Path(reports_dir)
    summary = read_preprocess_summary(processed_dir)
    train_split, val = load_split(processed_dir, "train"), load_split(processed_dir, "val")
    _check_monitor(params.monitor, val.risk == summary.risk_levels.index("high"))
    target = params.target
    class_names = summary.risk_levels if target == "risk" else summary.diagnoses
    n_classes = len(class_names)
    labels = train_split.labels(target)
    aux = target == "risk" and params.aux_dx_weight > 0

    checkpoints = Checkpoints(model_dir / "checkpoints", _fingerprint(params, processed_dir))
    keras.utils.set_random_seed(params.seed)
    scope = strategy_scope(params.distribution)  # variables live on every replica when mirrored
    with scope:
        model = build_model(
            summary.image_size,
            train_split.clinical.shape[1],
            n_classes,
            params,
            aux_classes=len(summary.diagnoses) if aux else 0,
        )
    served = served_output(model)  # shares the layers: validation scores what is trained
    weights = class_weights(labels, n_classes, params.class_weight_power) if params.class_weight_power else None
    sample_weights = np.array([weights[c] for c in labels], dtype=np.float32) if weights else None
    val_inputs = make_dataset(val, val.labels(target), batch_size=64, training=False).map(lambda x, y: x)
    validation = _validation_figures(served, val, val_inputs, target, summary)
    verbose = 1 if sys.stdout.isatty() else 0  # a bar on a terminal; every epoch's figures: epoch_line
    steps = params.steps_per_epoch or None
    resumed_from = 0

    def run_phase(phase: str, data, first_epoch: int, n_epochs: int, extra_callbacks: list) -> int:
        """Train one phase (resuming it if a checkpoint exists); returns its last global epoch."""
        nonlocal resumed_from
        state = checkpoints.state(phase)
        initial = first_epoch
        if state is not None:
            checkpoints.load_weights(model, f"{phase}.latest.weights.h5")
            checkpoints.truncate_history(state["epoch"])
            initial = resumed_from = state["epoch"]
            print(f"resuming training from the checkpoint of epoch {initial} in {checkpoints.root}")
        stopped = state is not None and state["epoch"] - state["best_epoch"] >= params.early_stopping_patience
        if not stopped and initial < first_epoch + n_epochs:
            # With EMA, the averaged weights are in the model at each epoch's end (before the
            # validation and checkpoint callback that follows) and the raw ones while it trains.
            ema = [keras.callbacks.SwapEMAWeights(swap_on_epoch=True)] if params.ema_momentum else []
            model.fit(
                data,
                epochs=first_epoch + n_epochs,
                initial_epoch=initial,
                steps_per_epoch=steps,
                callbacks=[*extra_callbacks, *ema, _resumable(phase, checkpoints, params, state, validation)]
                + ([_epoch_logger(run_id)] if run_id else []),
                verbose=verbose,
                shuffle=False,  # the dataset reshuffles itself each epoch
            )
        final = checkpoints.state(phase)
        if final is None:
            return first_epoch
        checkpoints.load_weights(model, f"{phase}.best.weights.h5")  # the best epoch, not the last
        checkpoints.mark_done(phase, model, final["epoch"])
        return final["epoch"]

    def train_data():
        targets = (labels, train_split.dx) if aux else labels
        data = make_dataset(
            train_split,
            targets,
            batch_size=params.batch_size,
            training=True,
            augment=params.augment,
            seed=params.seed,
            sample_weights=sample_weights,
        )
        return data.repeat() if steps else data

    # Phase 1: the head on a frozen backbone.
    head_done = checkpoints.done("head")
    if head_done is not None:
        checkpoints.load_weights(model, "head.weights.h5")
        head_last = head_done["last_epoch"]
        resumed_from = head_last
        print(f"resuming training after the finished head phase (epoch {head_last}) in {checkpoints.root}")
    elif params.head_epochs:
        _compile(model, params.learning_rate, params, n_classes)
        head_last = run_phase("head", train_data(), 0, params.head_epochs, [])
    else:
        head_last = 0

    # Phase 2: fine-tune the blocks from finetune_from_block on, at a lower (decaying) rate.
    if params.finetune_epochs:
        set_finetune(model, params.finetune_from_block)
        _compile(model, params.finetune_learning_rate, params, n_classes)
        batches = steps or -(-len(train_split) // params.batch_size)
        run_phase(
            "finetune", train_data(), head_last, params.finetune_epochs, _finetune_schedule(head_last, params, batches)
        )
        head, finetune = checkpoints.state("head"), checkpoints.state("finetune")
        if head and finetune and not _improved(params.monitor, finetune["best"], head["best"]):
            # Fine-tuning never beat the head phase on validation: keep the better model.
            print(
                f"fine-tuning peaked at {params.monitor} {finetune['best']:.4f}, not better than "
                f"{head['best']:.4f} after the head phase: keeping the head-phase weights"
            )
            checkpoints.load_weights(model, "head.weights.h5")

    # Temperature scaling on the validation split, over the views the saved model averages.
    val_views = view_probabilities(served, val, params.tta)
    val_labels = val.labels(target)
    temperature = fit_temperature(val_views, val_labels) if params.calibrate else 1.0
    if params.calibrate and not temperature_is_identifiable(val_views, val_labels):
        print(
            "every validation case is called right, so the validation split cannot fit a temperature "
            "(its log loss falls without bound as the temperature does): keeping temperature 1"
        )
    calibration = {"temperature": temperature, **_calibration_figures(val_views, val_labels, temperature)}
    print(
        f"temperature {temperature:.3f} (fitted on validation, {params.tta} views): validation log loss "
        f"{calibration['val_log_loss_before']:.4f} -> {calibration['val_log_loss_after']:.4f}, "
        f"ECE {calibration['val_ece_before']:.4f} -> {calibration['val_ece_after']:.4f}"
    )

    history = checkpoints.history().sort_values("epoch")
    with atomic_path(model_dir / MODEL_FILE) as staged:
        inference_model(served, params.tta, temperature).save(staged)
    history_path = reports_dir / HISTORY_FILE
    with atomic_path(history_path) as tmp:
        history.to_csv(tmp, index=False)

    phase_states = [s for s in (checkpoints.state("head"), checkpoints.state("finetune")) if s]
    best = None
    for state in phase_states:
        if best is None or _improved(params.monitor, state["best"], best["best"]):
            best = state
    result = TrainResult(
        model_path=str(model_dir / MODEL_FILE),
        history_path=str(history_path),
        run_id=run_id,
        target=target,
        class_names=list(class_names),
        epochs_run=len(history),
        monitor=params.monitor,
        best_epoch=int(best["best_epoch"]) if best else 0,
        best_value=float(best["best"]) if best else float("nan"),
        temperature=temperature,
        tta=params.tta,
        calibration=calibration,
        seconds=round(time.perf_counter() - started, 1),
        resumed_from_epoch=resumed_from,
    )
    write_json(model_dir / TRAIN_INFO_FILE, asdict(result))
    if run_id:
        _log_to_run(run_id, calibration, processed_dir)
    shutil.rmtree(checkpoints.root, ignore_errors=True)
    return result


def _epoch_logger(run_id: str):
    from tasks.tracking import epoch_logger

    return epoch_logger(run_id)


def _log_to_run(run_id: str, calibration: dict, processed_dir: Path) -> None:
    """The temperature and the calibration figures, all fitted or measured on the validation split, as
    ``val_*`` metrics; the training and validation splits as the run's datasets."""
    from tasks.schema import CASES_FILE
    from tasks.tracking import log_metrics, log_split_datasets

    log_metrics(run_id, {k if k.startswith("val_") else f"val_{k}": v for k, v in calibration.items()})
    log_split_datasets(run_id, processed_dir / CASES_FILE, ["train", "val"])
