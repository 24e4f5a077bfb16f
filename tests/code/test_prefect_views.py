"""What a person reads in the Prefect UI: task runs named by stage and case, figures rounded, and
links to the MLflow run and model version."""

from __future__ import annotations

import pytest

from tasks import prefect_tasks, tracking


def test_task_runs_are_named_by_stage_and_run():
    run_id = "0123456789abcdef0123456789abcdef"
    names = {
        task.name: task.task_run_name.format(run_id=run_id, raw_dir="data/raw", status="FAILED")
        for task in (prefect_tasks.validate, prefect_tasks.train, prefect_tasks.register, prefect_tasks.finish_tracking)
    }
    assert names == {
        "validate": "validate data/raw",
        "train": "train run 01234567",
        "register": "register run 01234567",
        "finish-tracking": "finish run 01234567 FAILED",
    }


def test_artifact_figures_are_rounded_for_people():
    assert prefect_tasks.rounded(0.8642137465123) == 0.8642
    assert prefect_tasks.rounded(1062) == 1062 and prefect_tasks.rounded("mel") == "mel"


def test_the_mlflow_link_of_a_local_store_says_how_to_open_it(mlflow_store):
    run_id = tracking.start_run("linked", {}, {})
    text = prefect_tasks.mlflow_link(run_id, ("skinrisk", "3"))
    experiment = tracking.client().get_run(run_id).info.experiment_id
    assert f"(http://127.0.0.1:5000/#/experiments/{experiment}/runs/{run_id})" in text
    assert "(http://127.0.0.1:5000/#/models/skinrisk/versions/3)" in text
    assert "make mlflow-ui" in text


def test_the_mlflow_link_of_a_server_points_at_it(mlflow_store, monkeypatch):
    run_id = tracking.start_run("linked", {}, {})
    experiment = tracking.client().get_run(run_id).info.experiment_id
    local = tracking.client()
    monkeypatch.setattr(tracking, "client", lambda: local)  # the run stays in this test's store
    monkeypatch.setattr(tracking, "tracking_uri", lambda: "http://127.0.0.1:5005/")
    text = prefect_tasks.mlflow_link(run_id)
    assert f"[run {run_id[:8]}](http://127.0.0.1:5005/#/experiments/{experiment}/runs/{run_id})" in text
    assert "make mlflow-ui" not in text


@pytest.mark.parametrize("stage", ["validate", "preprocess", "train", "evaluate", "explain", "reference", "register"])
def test_every_stage_task_run_is_named(stage):
    task = getattr(prefect_tasks, "reference_profile" if stage == "reference" else stage)
    assert task.task_run_name and task.task_run_name.startswith(stage)
