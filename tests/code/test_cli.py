import pytest

from tasks.cli import build_parser, main

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
    ["pipeline"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args([*command, "--help"])
    assert done.value.code == 0
    assert "--params" in capsys.readouterr().out


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
