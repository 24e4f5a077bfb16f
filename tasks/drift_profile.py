"""The drift profile: how a set of cases is described for drift monitoring, the same way at
training time (the reference, built by the ``reference`` stage, ``tasks/stages/reference.py``) and
for every monitored batch (``tasks/stages/monitor.py``).

A profile table has, per case: the clinical metadata (age, sex, site), image statistics
(brightness, contrast, mean colour, sharpness; the original image size when known), the principal
components of the model's image embeddings (the PCA is fitted on the reference and kept, so batches
are projected the same way) and the predicted risk distribution. :class:`ReferenceProfile` keeps
the reference table with that PCA and the clinical encoder and preprocessing the model was trained
with in one Parquet file, so the profile and the model are all that monitoring needs. Cases are
taken one image per lesion (:func:`one_per_lesion`): images of one lesion are not independent.
"""

from __future__ import annotations

import hashlib
import json
import weakref
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tasks.atomic import atomic_path
from tasks.clinical import ClinicalEncoder
from tasks.errors import DataError, SkinriskError
from tasks.params import MonitorParams
from tasks.schema import RISK_LEVELS, PreprocessSummary
from tasks.scored_model import Bundle

REFERENCE_FILE = "reference_profile.parquet"

PROFILE_FORMAT = 1
_META_KEY = b"skinrisk.reference_profile"

CLINICAL_COLUMNS: tuple[str, ...] = ("age", "sex", "localization")
IMAGE_COLUMNS: tuple[str, ...] = ("brightness", "contrast", "mean_red", "mean_green", "mean_blue", "sharpness")
SIZE_COLUMNS: tuple[str, ...] = ("image_width", "image_height")  # of the original files, when known
PREDICTION_COLUMNS: tuple[str, ...] = (*(f"p_{level}" for level in RISK_LEVELS), "predicted_level")
CATEGORICAL_COLUMNS: frozenset[str] = frozenset({"sex", "localization", "predicted_level"})
GROUPS: tuple[str, ...] = ("clinical", "image", "embedding", "prediction")

# ITU-R BT.601 luma weights: brightness and contrast as a person would judge them.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


# --- image statistics and embeddings ---------------------------------------------------------


def image_statistics(images: np.ndarray) -> pd.DataFrame:
    """Per-image brightness, contrast, mean colour and sharpness of uint8 RGB images (N x H x W x 3).

    Brightness and contrast are the mean and standard deviation of luminance; sharpness is the
    variance of its 4-neighbour Laplacian (blur lowers it). Computed on the model-size images, so
    the reference and every batch are measured after the same decoding and resizing.
    """
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected N x H x W x 3 images, got shape {images.shape}")
    blocks = [np.zeros((0, len(IMAGE_COLUMNS)))]
    for start in range(0, len(images), 256):  # bounded memory for large batches
        block = images[start : start + 256].astype(np.float32)
        luma = block @ _LUMA
        laplacian = (
            luma[:, :-2, 1:-1] + luma[:, 2:, 1:-1] + luma[:, 1:-1, :-2] + luma[:, 1:-1, 2:] - 4.0 * luma[:, 1:-1, 1:-1]
        )
        channel_means = [block[..., channel].mean(axis=(1, 2)) for channel in range(3)]
        sharpness = laplacian.reshape(len(block), -1).var(axis=1)
        blocks.append(np.column_stack([luma.mean(axis=(1, 2)), luma.std(axis=(1, 2)), *channel_means, sharpness]))
    return pd.DataFrame(np.concatenate(blocks), columns=list(IMAGE_COLUMNS), dtype=np.float64)


def original_sizes(paths: list[Path]) -> pd.DataFrame:
    """Width and height of image files as stored (headers only, nothing is decoded)."""
    from PIL import Image

    sizes = []
    for path in paths:
        try:
            with Image.open(path) as image:
                sizes.append(image.size)
        except OSError as exc:
            raise DataError(f"cannot read image {path}: {exc}") from exc
    return pd.DataFrame(sizes, columns=list(SIZE_COLUMNS), dtype=np.float64)


def model_fingerprint(model) -> str:
    """SHA-256 of the model's weights: the same whether it was loaded from a file or from MLflow."""
    digest = hashlib.sha256()
    for weights in model.get_weights():
        digest.update(np.ascontiguousarray(weights).tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class ModelOutputs:
    """What one forward pass gives for a set of cases: pooled image embeddings and risk probabilities."""

    embeddings: np.ndarray  # N x D
    risk_probs: np.ndarray  # N x len(RISK_LEVELS)
    called_levels: np.ndarray  # N level indices (tasks.decision)


# One two-output view per loaded model, so repeated batches reuse its compiled predict function.
_OUTPUT_MODELS: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def model_outputs(bundle: Bundle, images: np.ndarray, clinical: np.ndarray, batch_size: int = 64) -> ModelOutputs:
    """Single-view embeddings (``POOLED_LAYER``) and the saved model's risk probabilities (as
    ``predict_risk`` scores), in one pass."""
    import keras

    from tasks.images import normalize_for_mobilenet
    from tasks.metrics import risk_probabilities
    from tasks.model import POOLED_LAYER, single_view

    model = bundle.model
    both = _OUTPUT_MODELS.get(model)
    if both is None:
        base = single_view(model)
        embed = keras.Model(base.inputs, base.get_layer(POOLED_LAYER).output)
        both = _OUTPUT_MODELS[model] = keras.Model(model.inputs, [embed(model.inputs), model.output])
    embeddings, probs = [], []
    for start in range(0, len(images), 512):  # bounded memory for large batches
        block_embeddings, block_probs = both.predict(
            {
                "image": normalize_for_mobilenet(images[start : start + 512]),
                "clinical": clinical[start : start + 512],
            },
            batch_size=batch_size,
            verbose=0,
        )
        embeddings.append(block_embeddings)
        probs.append(block_probs)
    if not embeddings:
        raise DataError("no cases to score")
    risk = risk_probabilities(np.concatenate(probs), bundle.target, bundle.summary.diagnoses, bundle.summary.risk_map)
    risk = np.asarray(risk, dtype=np.float64)
    return ModelOutputs(np.concatenate(embeddings).astype(np.float64), risk, bundle.called_levels(risk))


# --- the reference profile -------------------------------------------------------------------


@dataclass(frozen=True)
class EmbeddingPCA:
    """Principal components of the training embeddings; batches are projected onto the same axes."""

    components: np.ndarray  # k x D
    mean: np.ndarray  # D
    explained_variance_ratio: np.ndarray  # k

    @classmethod
    def fit(cls, embeddings: np.ndarray, n_components: int, seed: int) -> EmbeddingPCA:
        from sklearn.decomposition import PCA

        k = max(1, min(n_components, embeddings.shape[0] - 1, embeddings.shape[1]))
        pca = PCA(n_components=k, svd_solver="full", random_state=seed).fit(embeddings)
        ratio = np.nan_to_num(pca.explained_variance_ratio_, nan=0.0)  # constant embeddings: no variance
        return cls(pca.components_.astype(np.float64), pca.mean_.astype(np.float64), ratio.astype(np.float64))

    @property
    def column_names(self) -> list[str]:
        return [f"embedding_pc{i + 1}" for i in range(len(self.components))]

    def project(self, embeddings: np.ndarray) -> pd.DataFrame:
        if embeddings.shape[1] != self.components.shape[1]:
            raise SkinriskError(
                f"the model's embeddings have {embeddings.shape[1]} dimensions, the reference profile's "
                f"PCA expects {self.components.shape[1]}: the profile was built for another model"
            )
        scores = (embeddings - self.mean) @ self.components.T
        return pd.DataFrame(scores, columns=self.column_names)

    def to_json(self) -> dict:
        return {name: array.tolist() for name, array in asdict(self).items()}

    @classmethod
    def from_json(cls, payload: dict) -> EmbeddingPCA:
        return cls(**{name: np.asarray(values, dtype=np.float64) for name, values in payload.items()})


def profile_table(
    frame: pd.DataFrame,
    stats: pd.DataFrame,
    outputs: ModelOutputs,
    pca: EmbeddingPCA,
    sizes: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """The monitored columns of a set of cases, in the same layout for the reference and a batch."""
    if not (len(stats) == len(outputs.embeddings) == len(outputs.risk_probs) == len(frame)):
        raise ValueError("frame, image statistics and model outputs must describe the same cases")
    cases = frame[["image_id", *CLINICAL_COLUMNS]].astype(
        {"image_id": str, "age": float, "sex": str, "localization": str}
    )
    predictions = pd.DataFrame(outputs.risk_probs, columns=[f"p_{level}" for level in RISK_LEVELS])
    predictions["predicted_level"] = np.asarray(RISK_LEVELS, dtype=object)[outputs.called_levels]
    parts = [cases.reset_index(drop=True), stats.reset_index(drop=True), pca.project(outputs.embeddings), predictions]
    if sizes is not None:  # beside the image statistics
        parts.insert(2, sizes.reset_index(drop=True))
    return pd.concat(parts, axis=1)


def column_groups(table: pd.DataFrame, pca: EmbeddingPCA) -> dict[str, list[str]]:
    """Monitored columns by group; the original image size only where the table has it."""
    image = [*IMAGE_COLUMNS, *(c for c in SIZE_COLUMNS if c in table.columns)]
    return {
        "clinical": list(CLINICAL_COLUMNS),
        "image": image,
        "embedding": pca.column_names,
        "prediction": list(PREDICTION_COLUMNS),
    }


@dataclass(frozen=True)
class ReferenceProfile:
    """The reference table plus what a batch needs to be described the same way."""

    table: pd.DataFrame
    pca: EmbeddingPCA
    encoder: ClinicalEncoder
    preprocess: PreprocessSummary  # of the training data (image size, classes, risk map)
    meta: dict  # model fingerprint, sizes, provenance

    @property
    def image_size(self) -> int:
        return self.preprocess.image_size

    @property
    def groups(self) -> dict[str, list[str]]:
        return column_groups(self.table, self.pca)

    def save(self, path: Path) -> Path:
        """Write one Parquet file (the table; the rest as JSON in its schema metadata), atomically."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        payload = {
            **self.meta,
            "format": PROFILE_FORMAT,
            "pca": self.pca.to_json(),
            "encoder": asdict(self.encoder),
            "preprocess": self.preprocess.to_json(),
        }
        arrow = pa.Table.from_pandas(self.table, preserve_index=False)
        arrow = arrow.replace_schema_metadata({**(arrow.schema.metadata or {}), _META_KEY: json.dumps(payload)})
        path = Path(path)
        with atomic_path(path) as tmp:
            pq.write_table(arrow, tmp)
        return path

    @classmethod
    def load(cls, path: Path) -> ReferenceProfile:
        import pyarrow.parquet as pq

        path = Path(path)
        if not path.exists():
            raise SkinriskError(
                f"reference profile {path} not found: build it from the training data first "
                "(`skinrisk reference`, the reference stage, after training)"
            )
        try:
            arrow = pq.read_table(path)
            payload = json.loads((arrow.schema.metadata or {})[_META_KEY])
        except (KeyError, OSError, ValueError) as exc:
            raise SkinriskError(f"{path} is not a skinrisk reference profile ({exc}); rebuild it") from exc
        if payload.get("format") != PROFILE_FORMAT:
            raise SkinriskError(
                f"{path} has profile format {payload.get('format')}, this code reads {PROFILE_FORMAT}; rebuild it"
            )
        return cls(
            table=arrow.to_pandas(),
            pca=EmbeddingPCA.from_json(payload.pop("pca")),
            encoder=ClinicalEncoder.from_json(payload.pop("encoder")),
            preprocess=PreprocessSummary.from_json(payload.pop("preprocess")),
            meta=payload,
        )

    def bundle(self, model) -> Bundle:
        """A scoring bundle of ``model`` with the encoder and preprocessing the profile recorded."""
        return Bundle(model=model, encoder=self.encoder, summary=self.preprocess, operating_point=None)


def fit_reference(
    bundle: Bundle,
    frame: pd.DataFrame,
    images: np.ndarray,
    params: MonitorParams,
    *,
    sizes: pd.DataFrame | None = None,
    meta: dict | None = None,
) -> ReferenceProfile:
    """Describe ``frame``/``images`` (training cases) as a reference: features, PCA, predictions."""
    outputs = model_outputs(bundle, images, bundle.encoder.transform(frame))
    pca = EmbeddingPCA.fit(outputs.embeddings, params.embedding_components, params.seed)
    table = profile_table(frame, image_statistics(images), outputs, pca, sizes)
    return ReferenceProfile(
        table=table,
        pca=pca,
        encoder=bundle.encoder,
        preprocess=bundle.summary,
        meta={
            "model_fingerprint": model_fingerprint(bundle.model),
            "n_reference": len(table),
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "monitor_params": params.model_dump(mode="json"),
            **(meta or {}),
        },
    )


def one_per_lesion(lesion_ids: pd.Series | np.ndarray, seed: int) -> np.ndarray:
    """Sorted row positions keeping one randomly chosen image of each lesion (rows without an id all stay).

    The drift tests assume independent cases; several images of one lesion share its site, the
    patient's age and most of its look, and would make every test over-confident (HAM10000 has
    about 1.3 images per lesion).
    """
    ids = pd.Series(np.asarray(lesion_ids, dtype=object)).fillna("").astype(str).str.strip()
    order = np.random.default_rng(seed).permutation(len(ids))
    shuffled = ids.iloc[order]
    keep = (shuffled == "") | ~shuffled.duplicated()
    return np.sort(order[keep.to_numpy()])
