"""Typed pipeline parameters: ``params.yaml`` is parsed once, here, and validated with clear errors.

Each stage reads only its own section, matching the keys its ``dvc.yaml`` stage declares.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tasks.errors import ParamsError
from tasks.schema import risk_level_of


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataParams(_Section):
    """The embedded default sample used when no real data has been imported."""

    synthetic_images: int = Field(800, ge=20, description="images in the synthetic sample")
    synthetic_seed: int = 42
    synthetic_width: int = Field(600, ge=32)
    synthetic_height: int = Field(450, ge=32)


class ValidateParams(_Section):
    min_image_side: int = Field(32, ge=1, description="smallest plausible image side, pixels")
    max_image_side: int = Field(10_000, ge=1, description="largest plausible image side, pixels")
    max_examples: int = Field(5, ge=1, description="failing rows/files quoted per expectation")
    workers: int = Field(0, ge=0, description="image-check processes; 0 means one per core")


class PreprocessParams(_Section):
    image_size: int = Field(128, ge=32, le=1024, description="square model input side, pixels")
    missing_clinical: Literal["drop", "impute"] = "drop"
    val_fraction: float = Field(0.15, gt=0, lt=0.5)
    test_fraction: float = Field(0.15, gt=0, lt=0.5)
    seed: int = 42
    workers: int = Field(0, ge=0, description="image-decoding processes (or threads); 0 means one per core")
    executor: Literal["processes", "threads", "dask"] = Field(
        "processes", description="where image-decoding shards run: local processes or threads, or a Dask cluster"
    )
    dask_address: str = Field(
        "", description="Dask scheduler, e.g. tcp://10.0.0.5:8786; empty: a local cluster of `workers` processes"
    )
    duplicate_max_distance: int = Field(
        24,
        ge=-1,
        le=256,
        description="images of different lesions whose perceptual hashes (256 bits, any mirror or "
        "quarter turn) are this close are one split group (tasks/duplicates.py); -1: no search",
    )
    risk_map: dict[str, list[str]] = Field(
        default_factory=lambda: {
            "high": ["mel"],
            "moderate": ["bcc", "akiec"],
            "low": ["nv", "bkl", "df", "vasc"],
        },
        description="risk level -> diagnoses; every diagnosis in exactly one level",
    )

    @model_validator(mode="after")
    def _check_risk_map(self) -> PreprocessParams:
        risk_level_of(self.risk_map)
        if self.val_fraction + self.test_fraction >= 0.8:
            raise ValueError("val_fraction + test_fraction must leave at least 20% for training")
        return self

    def level_of(self) -> dict[str, str]:
        """Diagnosis -> risk level."""
        return risk_level_of(self.risk_map)


class AugmentParams(_Section):
    """Training-time augmentation; never applied to validation, test or serving inputs."""

    flip: bool = True
    rot90: bool = Field(True, description="random quarter turns (dermoscopic images have no up)")
    rotation: float = Field(0.1, ge=0, le=0.5, description="max rotation, fraction of a full turn")
    zoom: float = Field(0.1, ge=0, lt=1, description="max zoom in or out, fraction")
    brightness: float = Field(0.1, ge=0, lt=1, description="max brightness change, fraction")
    contrast: float = Field(0.1, ge=0, lt=1, description="max contrast change, fraction")


class TrainParams(_Section):
    target: Literal["risk", "dx"] = "risk"
    weights: str = Field("imagenet", description="imagenet, none, or a path to a weights file")
    alpha: float = Field(1.0, gt=0, description="MobileNetV2 width multiplier")
    image_units: int = Field(128, ge=4)
    clinical_units: int = Field(32, ge=2)
    fusion_units: int = Field(64, ge=2)
    dropout: float = Field(0.3, ge=0, lt=1)
    batch_size: int = Field(32, ge=1)
    head_epochs: int = Field(3, ge=0, description="epochs with the backbone frozen, at learning_rate")
    finetune_epochs: int = Field(10, ge=0, description="epochs with the blocks from finetune_from_block trainable")
    finetune_from_block: int = Field(9, ge=1, le=16, description="first MobileNetV2 block to fine-tune")
    learning_rate: float = Field(1e-3, gt=0)
    finetune_learning_rate: float = Field(3e-4, gt=0, description="fine-tuning's first rate")
    finetune_schedule: Literal["cosine", "constant"] = Field(
        "cosine", description="cosine: the rate decays per epoch to 0 over finetune_epochs"
    )
    finetune_warmup_epochs: int = Field(
        1, ge=0, description="epochs over which fine-tuning's rate rises linearly, batch by batch, from 0"
    )
    loss: Literal["cross_entropy", "focal"] = "cross_entropy"
    focal_gamma: float = Field(2.0, ge=0)
    class_weight_power: float = Field(
        0.5, ge=0, le=1, description="class weights: balanced weights to this power (0 none, 1 fully balanced)"
    )
    aux_dx_weight: float = Field(
        0.5, ge=0, description="loss weight of an auxiliary 7-diagnosis head (target risk only; 0: none)"
    )
    monitor: Literal["val_loss", "val_high_risk_auc", "val_balanced_accuracy"] = Field(
        "val_loss", description="validation figure for the best epoch and early stopping"
    )
    early_stopping_patience: int = Field(4, ge=1)
    ema_momentum: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="an exponential moving average of the weights, per step, is what validation scores "
        "and what is kept (Keras' use_ema + SwapEMAWeights); 0: the raw weights",
    )
    tta: Literal["none", "flips", "dihedral"] = Field(
        "flips", description="test-time views averaged by the saved model (1, 4 or 8)"
    )
    calibrate: bool = Field(True, description="fit a softmax temperature on validation, inside the saved model")
    steps_per_epoch: int = Field(0, ge=0, description="0: the whole training split each epoch")
    seed: int = 42
    distribution: Literal["none", "mirrored"] = Field(
        "none", description="mirrored: replicate training over the visible GPUs (tasks/distribution.py)"
    )
    augment: AugmentParams = AugmentParams()

    @field_validator("weights")
    @classmethod
    def _check_weights(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("weights must be 'imagenet', 'none' or a path to a weights file")
        return value


class EvaluateParams(_Section):
    target_recall: float = Field(
        0.90, gt=0, le=1, description="high-risk recall the triage threshold is chosen for (on val)"
    )
    operating_recalls: list[float] = Field(
        [0.90, 0.95], description="high-risk recalls whose operating points (chosen on val) are reported"
    )
    bootstrap_resamples: int = Field(1000, ge=100)
    calibration_bins: int = Field(15, ge=2)
    seed: int = 0

    @field_validator("operating_recalls")
    @classmethod
    def _check_recalls(cls, value: list[float]) -> list[float]:
        if any(not 0 < r <= 1 for r in value):
            raise ValueError("every operating recall must be in (0, 1]")
        return sorted(set(value))


class PromoteParams(_Section):
    """Gates a challenger must pass, on the same evaluation data as the champion, to replace it."""

    min_high_risk_auc: float = Field(
        0.70, ge=0, le=1, description="high-risk ROC-AUC floor, also for the first champion"
    )
    max_high_risk_auc_drop: float = Field(0.01, ge=0, lt=1, description="tolerated high-risk AUC drop vs the champion")
    max_balanced_accuracy_drop: float = Field(0.01, ge=0, lt=1, description="tolerated drop vs the champion")
    min_high_risk_recall: float = Field(0.85, ge=0, le=1, description="floor at the triage operating point")
    max_ece: float = Field(0.15, gt=0, le=1, description="expected calibration error bound")
    min_balanced_accuracy: float = Field(0.40, ge=0, le=1, description="absolute floor, also for the first champion")
    bootstrap_resamples: int = Field(200, ge=100)


# MobileNetV2's activation and residual-sum layers (Keras' names), the layers Grad-CAM can be taken
# from: a stem, then blocks 1-16 (an expand and a depthwise ReLU each, block 0 has no expand; a
# residual sum where a block keeps its shape), then the last 1x1 conv's ReLU. A test checks the
# names against Keras' own MobileNetV2.
_RESIDUAL_BLOCKS = (2, 4, 5, 7, 8, 9, 11, 12, 14, 15)
MOBILENET_V2_GRADCAM_LAYERS: tuple[str, ...] = (
    "Conv1_relu",
    "expanded_conv_depthwise_relu",
    *(
        name
        for block in range(1, 17)
        for name in (
            f"block_{block}_expand_relu",
            f"block_{block}_depthwise_relu",
            *((f"block_{block}_add",) if block in _RESIDUAL_BLOCKS else ()),
        )
    ),
    "out_relu",
)


class ExplainParams(_Section):
    cases_per_level: int = Field(3, ge=1, description="test cases explained per true risk level")
    confidently_wrong: int = Field(3, ge=0, description="most confident wrong predictions added")
    shap_background: int = Field(50, ge=5, description="training cases SHAP integrates over")
    shap_cases: int = Field(100, ge=1, description="test cases in the global SHAP summary")
    overlay_alpha: float = Field(0.4, gt=0, lt=1)
    gradcam_layer: str = Field(
        "block_13_expand_relu", description="MobileNetV2 layer Grad-CAM is taken from (benchmarks/gradcam_layers.py)"
    )
    seed: int = 0

    @field_validator("gradcam_layer")
    @classmethod
    def _check_gradcam_layer(cls, value: str) -> str:
        if value not in MOBILENET_V2_GRADCAM_LAYERS:
            raise ValueError(
                f"{value!r} is not a MobileNetV2 activation layer; use out_relu (4x4 at 128 px), "
                "block_13_expand_relu (8x8) or block_6_expand_relu (16x16), or another block_N_expand_relu"
            )
        return value


class MonitorParams(_Section):
    drift_share: float = Field(0.3, gt=0, le=1, description="drifted-column share that raises the alarm")
    stattest_threshold: float = Field(0.05, gt=0, lt=1, description="p-value (or distance) threshold per column")
    embedding_components: int = Field(5, ge=1, description="principal components of image embeddings tracked")
    reference_size: int = Field(1000, ge=50, description="training cases kept in the reference profile")
    retrain_deployment: str = Field("skinrisk-retraining/retrain-weekly", description="flow/deployment to trigger")
    seed: int = 0


class Params(_Section):
    data: DataParams = DataParams()
    validate_: ValidateParams = Field(ValidateParams(), alias="validate")
    preprocess: PreprocessParams = PreprocessParams()
    train: TrainParams = TrainParams()
    evaluate: EvaluateParams = EvaluateParams()
    promote: PromoteParams = PromoteParams()
    explain: ExplainParams = ExplainParams()
    monitor: MonitorParams = MonitorParams()

    model_config = ConfigDict(populate_by_name=True)  # merged with _Section's

    def flat(self) -> dict[str, Any]:
        """``section.key`` -> value, as logged to MLflow (``risk_map`` stays one value)."""

        def walk(prefix: str, value: Any) -> dict[str, Any]:
            if isinstance(value, dict) and not prefix.endswith(".risk_map"):
                return {k: v for key, sub in value.items() for k, v in walk(f"{prefix}.{key}".lstrip("."), sub).items()}
            return {prefix: value}

        return walk("", self.model_dump(by_alias=True, mode="json"))


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ParamsError(f"--set {item!r}: expected section.key=value, e.g. preprocess.seed=7")
    dotted, raw_value = item.split("=", 1)
    keys = [k for k in dotted.strip().split(".") if k]
    if len(keys) < 2:
        raise ParamsError(f"--set {item!r}: the key must name a section and a key, e.g. train.epochs")
    try:
        value = yaml.safe_load(raw_value) if raw_value.strip() else ""
    except yaml.YAMLError as exc:
        raise ParamsError(f"--set {item!r}: the value is not valid YAML ({exc})") from exc
    return keys, value


def _fields(model: type[BaseModel]) -> dict[str, Any]:
    """A section's fields by their ``params.yaml`` names (``validate``, not ``validate_``)."""
    return {field.alias or name: field for name, field in model.model_fields.items()}


def _check_known_key(keys: list[str], item: str) -> None:
    model: type[BaseModel] = Params
    for depth, key in enumerate(keys):
        fields = _fields(model)
        if key not in fields:
            where = ".".join(keys[:depth]) or "params"
            raise ParamsError(
                f"--set {item!r}: unknown key {'.'.join(keys[: depth + 1])!r}; {where} accepts: {sorted(fields)}"
            )
        annotation = fields[key].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return
        model = annotation


def _format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"invalid parameters in {source}:"]
    for error in exc.errors():
        loc = ".".join(str(part) for part in error["loc"])
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            model: Any = Params
            for part in error["loc"][:-1]:
                model = _fields(model)[str(part)].annotation
            message = f"unknown key; accepted keys here: {sorted(_fields(model))}"
        lines.append(f"  {loc}: {message} (got {error.get('input')!r})")
    return "\n".join(lines)


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice (delete one)", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_params(path: Path | str = "params.yaml", overrides: list[str] | None = None) -> Params:
    """Read ``path``, apply ``section.key=value`` overrides, and validate everything once."""
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"parameters file {path} not found (run from the project root or pass --params)")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
    except yaml.MarkedYAMLError as exc:  # one line: where, and what
        mark = exc.problem_mark
        where = f"{path} line {mark.line + 1}, column {mark.column + 1}" if mark else str(path)
        raise ParamsError(f"{where}: {exc.problem or exc}; fix {path}") from None
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ParamsError(f"{path} must be a mapping of sections, got {type(raw).__name__}")
    for item in overrides or []:
        keys, value = _parse_override(item)
        _check_known_key(keys, item)
        node = raw
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ParamsError(f"--set {item!r}: {key!r} is not a section")
        node[keys[-1]] = value
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        source = f"{path}" + (f" with --set {' '.join(overrides)}" if overrides else "")
        raise ParamsError(_format_validation_error(exc, source)) from None
