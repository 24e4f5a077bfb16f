"""Scale-out on Dask: image decoding (preprocess) and triage scoring run their shards on a local
cluster of two worker processes and give byte-identical results to the single-process run."""

import json
import logging

import numpy as np
import pandas as pd
import pytest

from tasks.dataset import IMAGES_FILE
from tasks.errors import SkinriskError
from tasks.images import decode_images
from tasks.params import PreprocessParams
from tasks.schema import CASES_FILE, ENCODER_FILE, SPLITS, raw_image_path
from tasks.stages.preprocess import preprocess
from tests.support import free_port

pytestmark = pytest.mark.slow  # starts Dask clusters (worker processes)


@pytest.fixture(scope="module")
def scheduler():
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0", silence_logs=logging.ERROR
    ) as cluster:
        yield cluster.scheduler_address


@pytest.fixture(scope="module")
def image_paths(raw_dir):
    metadata = pd.read_csv(raw_dir / "metadata.csv")
    return [raw_image_path(raw_dir, image_id) for image_id in metadata["image_id"]]


def test_decoding_on_dask_is_byte_identical_to_one_process(scheduler, image_paths, tmp_path):
    alone = decode_images(image_paths, 32, workers=1)
    on_dask = decode_images(image_paths, 32, workers=2, executor="dask", dask_address=scheduler)
    pool = decode_images(image_paths, 32, workers=2)
    in_file = decode_images(image_paths, 32, workers=2, out=tmp_path / "images.npy")  # workers write the file
    threads = decode_images(image_paths, 32, workers=2, executor="threads", out=tmp_path / "threads.npy")
    assert on_dask.dtype == alone.dtype == np.uint8 and on_dask.shape == alone.shape == (len(image_paths), 32, 32, 3)
    assert on_dask.tobytes() == alone.tobytes() == pool.tobytes() == in_file.tobytes() == threads.tobytes()
    assert np.load(tmp_path / "images.npy").tobytes() == alone.tobytes()


def test_a_local_cluster_is_started_when_no_scheduler_is_named(image_paths):
    alone = decode_images(image_paths[:40], 32, workers=1)
    on_local_cluster = decode_images(image_paths[:40], 32, workers=2, executor="dask", dask_address="")
    assert on_local_cluster.tobytes() == alone.tobytes()


def test_preprocess_on_dask_writes_the_same_splits(scheduler, raw_dir, tmp_path):
    preprocess(raw_dir, tmp_path / "alone", PreprocessParams(image_size=32, workers=1))
    preprocess(
        raw_dir,
        tmp_path / "dask",
        PreprocessParams(image_size=32, workers=2, executor="dask", dask_address=scheduler),
    )
    for split in SPLITS:
        alone, on_dask = np.load(tmp_path / "alone" / f"{split}.npz"), np.load(tmp_path / "dask" / f"{split}.npz")
        assert set(alone.files) == set(on_dask.files)
        for name in alone.files:
            assert alone[name].dtype == on_dask[name].dtype
            assert alone[name].tobytes() == on_dask[name].tobytes(), (split, name)
    for name in (IMAGES_FILE, CASES_FILE, ENCODER_FILE):
        assert (tmp_path / "alone" / name).read_bytes() == (tmp_path / "dask" / name).read_bytes()


def test_triage_on_dask_writes_the_same_queue(scheduler, raw_dir, processed_dir, tmp_path):
    from tasks.clinical import ClinicalEncoder
    from tasks.model import build_model
    from tasks.schema import read_preprocess_summary
    from tasks.scored_model import Bundle
    from tasks.triage import triage
    from tests.support import tiny_train_params

    encoder = ClinicalEncoder.load(processed_dir / ENCODER_FILE)
    cases = pd.read_csv(processed_dir / CASES_FILE).head(70)
    n_clinical = encoder.transform(cases).shape[1]
    bundle = Bundle(
        model=build_model(32, n_clinical, 3, tiny_train_params()),
        encoder=encoder,
        summary=read_preprocess_summary(processed_dir),
        operating_point={"threshold": 0.3},
    )
    rows = [
        {"image": f"{image_id}.jpg", "age": age, "sex": sex, "localization": site}
        for image_id, age, sex, site in cases[["image_id", "age", "sex", "localization"]].itertuples(index=False)
    ]
    rows[5]["localization"] = "elbow"  # invalid rows are reported the same way too
    rows[66]["image"] = "nowhere.jpg"
    pd.DataFrame(rows).to_csv(tmp_path / "cases.csv", index=False)
    images = raw_dir / "images"

    alone = triage(bundle, tmp_path / "cases.csv", images, tmp_path / "alone.csv")
    on_dask = triage(
        bundle,
        tmp_path / "cases.csv",
        images,
        tmp_path / "dask.csv",
        executor="dask",
        dask_address=scheduler,
        shard_size=16,
    )
    assert (alone.n_scored, alone.n_invalid) == (on_dask.n_scored, on_dask.n_invalid) == (68, 2)
    assert (tmp_path / "alone.csv").read_bytes() == (tmp_path / "dask.csv").read_bytes()
    assert (tmp_path / "alone.invalid.csv").read_bytes() == (tmp_path / "dask.invalid.csv").read_bytes()


def test_an_unreachable_scheduler_is_a_clear_error(monkeypatch, image_paths):
    from tasks import shards

    monkeypatch.setattr(shards, "CONNECT_TIMEOUT_S", 2)
    address = f"tcp://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(SkinriskError, match="no Dask scheduler answers") as caught:
        decode_images(image_paths[:20], 32, executor="dask", dask_address=address)
    assert address in str(caught.value)
    assert json.dumps(str(caught.value))  # one readable line, not a traceback
