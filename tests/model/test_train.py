"""Training behaviour on the learnable synthetic sample: it learns, and it resumes after a kill."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tasks.params import EvaluateParams
from tests.support import PROJECT_ROOT, tiny_train_params

pytestmark = pytest.mark.slow


def test_training_writes_model_history_and_info(trained):
    out, result, _ = trained
    assert Path(result.model_path).exists()
    history = pd.read_csv(result.history_path)
    assert history["epoch"].tolist() == list(range(1, len(history) + 1))
    assert set(history["phase"]) == {"head", "finetune"}
    assert {"loss", "val_loss", "val_balanced_accuracy", "val_high_risk_auc", "val_high_risk_recall"} <= set(
        history.columns
    )
    assert json.loads((out / "models" / "train.json").read_text())["epochs_run"] == len(history)
    assert not (out / "models" / "checkpoints").exists(), "checkpoints are removed after success"


def test_trained_model_beats_the_majority_class_on_balanced_accuracy(trained):
    out, _, metrics = trained
    # The majority-class baseline has balanced accuracy 1/3 over the three levels and no ranking skill.
    assert metrics["balanced_accuracy"] > 0.5, metrics["balanced_accuracy"]
    assert metrics["balanced_accuracy_ci95"][0] > 1 / 3
    assert metrics["roc_auc_ovr"] > 0.7, metrics["roc_auc_ovr"]
    assert metrics["high_risk_roc_auc"] > 0.7 and metrics["high_risk_roc_auc_ci95"][0] > 0.5, metrics[
        "high_risk_roc_auc"
    ]
    assert set(metrics["operating_points"]) == {"recall_0.90", "recall_0.95"}
    for name in ("confusion_matrix.png", "reliability.png", "training_curves.png", "metrics.json", "predictions.csv"):
        assert (out / "reports" / name).exists(), name
    point = json.loads((out / "models" / "operating_point.json").read_text())
    assert 0 < point["threshold"] < 1 and point["target_recall"] == 0.9


def test_diagnosis_target_sums_to_risk_levels(processed_dir, tmp_path):
    from tasks.stages.evaluate import evaluate
    from tasks.stages.train import train

    result = train(
        processed_dir,
        tmp_path / "models",
        tmp_path / "reports",
        tiny_train_params(target="dx", head_epochs=2, finetune_epochs=0),
    )
    assert result.class_names == ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    metrics = evaluate(
        Path(result.model_path),
        processed_dir,
        tmp_path / "reports",
        tmp_path / "models",
        EvaluateParams(bootstrap_resamples=100),
    )
    assert len(metrics["confusion_matrix"]) == 3


def test_head_phase_is_kept_when_fine_tuning_never_beats_it(processed_dir, tmp_path, capsys):
    from tasks.stages.train import train

    # Fine-tuning at a vanishing rate cannot beat the head phase on validation loss: the whole
    # model must fall back to the head phase's snapshot.
    params = tiny_train_params(
        head_epochs=2, finetune_epochs=1, finetune_learning_rate=1e-12, finetune_schedule="constant"
    )
    result = train(processed_dir, tmp_path / "models", tmp_path / "reports", params)
    history = pd.read_csv(result.history_path)
    assert history["phase"].tolist() == ["head", "head", "finetune"] and np.isfinite(history["val_loss"]).all()
    assert "keeping the head-phase weights" in capsys.readouterr().out
    head_best = history.loc[history["phase"] == "head", "val_loss"].min()
    assert result.monitor == "val_loss" and result.best_value == pytest.approx(head_best)


def test_fine_tuning_follows_the_cosine_schedule_and_the_model_is_calibrated(trained):
    from tasks.stages.train import _finetune_schedule

    out, result, metrics = trained
    history = pd.read_csv(result.history_path)
    rates = history.loc[history["phase"] == "finetune", "learning_rate"].to_numpy()
    assert rates[0] == pytest.approx(1e-3), "fine-tuning's first epoch ends at finetune_learning_rate"
    params = tiny_train_params(finetune_epochs=4, finetune_learning_rate=1e-3, finetune_warmup_epochs=1)
    (rate,) = _finetune_schedule(12, params, batches_per_epoch=10)
    assert [round(rate.epoch_rate(e), 7) for e in range(12, 16)] == [0.001, 0.0008536, 0.0005, 0.0001464]

    class Optimizer:
        learning_rate = None

    class Model:
        optimizer = Optimizer()

    rate.set_model(Model())
    seen = []
    for epoch in (12, 13):
        rate.on_epoch_begin(epoch)
        for batch in range(10):
            rate.on_train_batch_begin(batch)
            seen.append(Model.optimizer.learning_rate)
    # a linear warm-up over the first epoch's batches, then the cosine value of each epoch
    assert seen[:10] == pytest.approx([1e-4 * (b + 1) for b in range(10)])
    assert seen[10:] == pytest.approx([0.0008536] * 10, abs=1e-7)
    info = json.loads((out / "models" / "train.json").read_text())
    assert info["tta"] == "flips" and info["temperature"] == pytest.approx(metrics["calibration"]["temperature"])
    # the temperature is fitted on validation: its log loss there can only go down
    assert info["calibration"]["val_log_loss_after"] <= info["calibration"]["val_log_loss_before"] + 1e-9


def test_a_killed_training_run_resumes_from_its_last_checkpoint(processed_dir, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text((PROJECT_ROOT / "params.yaml").read_text())
    settings = tiny_train_params(head_epochs=12, finetune_epochs=1)
    overrides = [f"train.{k}={v}" for k, v in settings.model_dump(exclude={"augment"}).items()]
    command = [
        sys.executable,
        "-m",
        "tasks.cli",
        "train",
        "--no-tracking",
        "--params",
        str(params),
        "--processed-dir",
        str(processed_dir),
        "--model-dir",
        str(tmp_path / "models"),
        "--reports-dir",
        str(tmp_path / "reports"),
    ]
    for item in overrides:
        command += ["--set", item]
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    history = tmp_path / "models" / "checkpoints" / "history.csv"

    first = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and first.poll() is None:
        if history.exists() and len(pd.read_csv(history)) >= 2:
            break
        time.sleep(0.2)
    assert first.poll() is None, "training ended before it could be killed:\n" + first.stdout.read().decode()
    first.send_signal(signal.SIGKILL)
    first.wait()
    done_before_kill = len(pd.read_csv(history))
    assert not (tmp_path / "models" / "model.keras").exists()

    second = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "resuming training from the checkpoint of epoch" in second.stdout
    final = pd.read_csv(tmp_path / "reports" / "training_history.csv")
    assert final["epoch"].tolist() == list(range(1, len(final) + 1)), "no epoch lost or repeated"
    resumed_at = int(second.stdout.split("checkpoint of epoch ")[1].split()[0])
    assert resumed_at >= done_before_kill - 1
    # The resumed run trained only the epochs left, not all of them again.
    assert second.stdout.count("Epoch ") <= len(final) - resumed_at + 1 + 1


def test_weight_averaging_keeps_the_averaged_weights(processed_dir, tmp_path):
    """With ``ema_momentum`` the kept model is the moving average of the weights, which trails
    the raw weights. Keras starts the average at the weights after the first step, so at momentum
    0.999 the kept weights are about one Adam step (the rate) from the start, the raw ones many."""
    from tasks.model import build_model, head_of, load_model, single_view
    from tasks.schema import read_preprocess_summary
    from tasks.stages.train import train

    summary = read_preprocess_summary(processed_dir)

    def output_kernel(params) -> np.ndarray:
        return head_of(params).get_layer("probabilities").get_weights()[0]

    moved = {}
    for ema in (0.0, 0.999):
        params = tiny_train_params(
            head_epochs=1, finetune_epochs=0, steps_per_epoch=12, learning_rate=1e-2, ema_momentum=ema, calibrate=False
        )
        result = train(processed_dir, tmp_path / f"ema-{ema}" / "models", tmp_path / f"ema-{ema}" / "reports", params)
        start = build_model(summary.image_size, result_clinical(processed_dir), 3, params, aux_classes=7)
        kept = output_kernel(single_view(load_model(result.model_path)))
        moved[ema] = float(np.abs(kept - output_kernel(start)).mean())
    assert moved[0.0] > 0, "the raw weights moved"
    assert moved[0.999] < 0.5 * moved[0.0], moved


def result_clinical(processed_dir) -> int:
    from tasks.dataset import load_split

    return load_split(processed_dir, "train").clinical.shape[1]
