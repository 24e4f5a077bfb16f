"""dvc.yaml's deps are complete: every project module a stage's command runs is a dependency, so
editing it reruns that stage under ``dvc repro``.

The modules a stage runs are derived from the imports: the CLI handler of the stage's command,
then every ``tasks``/``flows`` module it imports (at module level or inside a function), transitively.
"""

from __future__ import annotations

import ast
import inspect
import shlex
from pathlib import Path

import pytest
import typer
import yaml
from typer.core import TyperGroup

from tasks.cli import app

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("tasks", "flows")
STAGES_PACKAGE = "tasks/stages"  # one module per stage; its __init__ is a docstring


def _imported_modules(tree: ast.AST) -> set[str]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            # `from tasks import paths` imports the module tasks.paths
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name.split(".")[0] in PACKAGES and _module_file(name)}


def _module_file(module: str) -> Path | None:
    path = ROOT.joinpath(*module.split("."))
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return None


def _called_helpers(tree: ast.AST, functions: dict[str, ast.FunctionDef]) -> list[ast.FunctionDef]:
    """The CLI module's own functions that ``tree`` calls, and those they call, transitively."""
    found: dict[str, ast.FunctionDef] = {}
    pending = [tree]
    while pending:
        for node in ast.walk(pending.pop()):
            if isinstance(node, ast.Name) and node.id in functions and node.id not in found:
                found[node.id] = functions[node.id]
                pending.append(functions[node.id])
    return list(found.values())


def modules_run_by(handler) -> set[Path]:
    """The project's module files a CLI handler runs: its own imports, those of the CLI module's
    helper functions it calls and the module's top-level ones (not those of the module's other
    handlers), then theirs, transitively."""
    cli = ast.parse(Path(inspect.getfile(handler)).read_text(encoding="utf-8"))
    top_level = ast.Module(body=[n for n in cli.body if isinstance(n, ast.Import | ast.ImportFrom)], type_ignores=[])
    functions = {n.name: n for n in cli.body if isinstance(n, ast.FunctionDef)}
    own = ast.parse(inspect.getsource(handler))
    own.body[0].decorator_list = []  # the runner every command shares (console, lock) writes no output
    pending = _imported_modules(own) | _imported_modules(top_level)
    for helper in _called_helpers(own, {k: v for k, v in functions.items() if k != handler.__name__}):
        pending |= _imported_modules(helper)
    seen: set[str] = {handler.__module__}
    while pending:
        module = pending.pop()
        if module in seen:
            continue
        seen.add(module)
        pending |= _imported_modules(ast.parse(_module_file(module).read_text(encoding="utf-8")))
    return {_module_file(m).relative_to(ROOT) for m in seen} - {
        Path(p, "__init__.py") for p in (*PACKAGES, STAGES_PACKAGE)
    }


def handler_of(argv: list[str]):
    """The handler of the skinrisk command that ``argv`` names (its options parsed, so they must be valid)."""
    command, words = typer.main.get_command(app), list(argv)
    while isinstance(command, TyperGroup):
        command = command.commands[words.pop(0)]
    command.make_context("skinrisk", words)
    return inspect.unwrap(command.callback)


def _covered(module: Path, deps: list[str]) -> bool:
    return any(module == Path(dep) or Path(dep) in module.parents for dep in deps)


STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_module_a_stage_runs_is_a_dependency(stage: str) -> None:
    spec = STAGES[stage]
    command = shlex.split(spec["cmd"])
    assert command[0] == "skinrisk", f"stage {stage} does not run the skinrisk CLI"
    handler = handler_of(command[1:])
    run = modules_run_by(handler)
    missing = sorted(str(m) for m in run if not _covered(m, spec["deps"]))
    assert not missing, f"dvc.yaml stage {stage!r} runs these modules without listing them in deps: {missing}"
    # and no module it does not run: editing one would rerun the stage for nothing
    listed = {Path(d) for d in spec["deps"] if d.startswith(tuple(f"{p}/" for p in PACKAGES)) and d.endswith(".py")}
    extra = sorted(str(m) for m in listed - run)
    assert not extra, f"dvc.yaml stage {stage!r} lists modules its command does not run: {extra}"


def test_the_derivation_finds_lazy_imports() -> None:
    """The check itself can fail: a function-level import is found, transitively."""
    from tasks.cli import cmd_train

    modules = modules_run_by(cmd_train)
    assert Path("tasks/stages/train.py") in modules  # imported inside cmd_train
    assert Path("tasks/model.py") in modules  # imported inside a function of tasks/stages/train.py
    assert Path("tasks/cli.py") in modules
    assert not _covered(Path("tasks/model.py"), ["tasks/stages/train.py", "data/processed"])


def _outs(stage: str) -> set[str]:
    return {next(iter(out)) if isinstance(out, dict) else out for out in STAGES[stage].get("outs", [])}


def test_the_stages_that_log_to_the_run_come_before_register_closes_it() -> None:
    """Under ``dvc repro`` register ends the pipeline's MLflow run: explain and reference, which log
    to it, must be its upstream (DVC orders stages only by their deps)."""
    deps = set(STAGES["register"]["deps"])
    for stage in ("train", "evaluate", "explain", "reference"):
        assert _outs(stage) & deps, f"nothing orders {stage} before register"


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_a_stage_has_one_name_in_dvc_the_cli_prefect_and_its_module(stage: str) -> None:
    from prefect import Task

    from tasks import prefect_tasks

    command = shlex.split(STAGES[stage]["cmd"])
    assert command[0] == "skinrisk" and stage in command[1:3], f"dvc stage {stage!r} runs {command}"
    names = {task.name for task in vars(prefect_tasks).values() if isinstance(task, Task)}
    assert stage in names, f"no Prefect task named {stage!r} (tasks: {sorted(names)})"
    module = Path(STAGES_PACKAGE, f"{stage}.py")
    assert (ROOT / module).is_file(), f"no stage module {module}"
    assert str(module) in STAGES[stage]["deps"], f"stage {stage!r} does not run its own module {module}"


def test_stage_modules_import_the_domain_layer_never_each_other() -> None:
    stages = sorted((ROOT / STAGES_PACKAGE).glob("[!_]*.py"))
    assert len(stages) >= 7, stages
    for module in stages:
        imported = _imported_modules(ast.parse(module.read_text(encoding="utf-8")))
        others = sorted(m for m in imported if m.startswith("tasks.stages") and m != f"tasks.stages.{module.stem}")
        assert not others, f"{module.relative_to(ROOT)} imports the stage module(s) {others}"
    assert (ROOT / STAGES_PACKAGE / "__init__.py").read_text(encoding="utf-8").lstrip().startswith('"""')
