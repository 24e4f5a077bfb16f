import pytest

from tasks.cli import main

COMMANDS = [
    ["data", "synth"],
    ["data", "import"],
    ["data", "download"],
    ["data", "ensure"],
    ["validate"],
    ["preprocess"],
    ["train"],
    ["evaluate"],
    ["register"],
    ["explain"],
    ["reference"],
    ["monitor-reference"],  # the alias it had
    ["monitor"],
    ["triage"],
    ["registry", "show"],
    ["registry", "promote"],
    ["registry", "rollback"],
    ["serve"],
    ["app"],
    ["model-card"],
    ["pipeline"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_has_help(command, capsys):
    assert main([*command, "--help"]) == 0
    assert "--params" in capsys.readouterr().out


@pytest.mark.parametrize("command", [["preprocess", "--set"], ["train", "--no-such-option"], ["data"], []], ids=repr)
def test_a_usage_error_exits_2_with_the_usage(command, capsys):
    assert main(command) == 2
    assert "Error: " in capsys.readouterr().err


def test_a_stage_without_data_says_what_to_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    params = tmp_path / "params.yaml"
    params.write_text("{}\n")
    assert main(["preprocess", "--params", str(params)]) == 1
    assert "skinrisk data import" in capsys.readouterr().err


def test_a_bad_override_is_refused_with_the_accepted_keys(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text("{}\n")
    assert main(["preprocess", "--params", str(params), "--set", "preprocess.size=64"]) == 1
    assert "image_size" in capsys.readouterr().err


def test_explain_with_a_missing_model_is_a_clear_error(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text("{}\n")
    code = main(
        [
            "explain",
            "--params",
            str(params),
            "--model",
            str(tmp_path / "nope.keras"),
            "--image",
            str(tmp_path / "x.jpg"),
            "--sex",
            "male",
            "--site",
            "back",
            "--age",
            "40",
            "--processed-dir",
            str(tmp_path),
        ]
    )
    assert code == 1
    assert "not found" in capsys.readouterr().err
