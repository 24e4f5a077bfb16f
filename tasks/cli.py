"""The ``skinrisk`` command line (Typer): one command per pipeline stage, all sharing --params/--set.

Heavy libraries (TensorFlow, Prefect, MLflow) are imported inside the command that needs them,
so ``skinrisk --help`` and the data commands start quickly. Even the params (pydantic) wait for a
command: a spawned worker process re-imports this module as its main module, and should not pay
0.2 s for what it never uses.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer

from tasks import paths
from tasks.errors import SkinriskError

if TYPE_CHECKING:
    from tasks.params import ExplainParams, Params

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# Prefect's in-process API server gets 20 s to start by default: too little for a cold first run
# (fresh venv, bytecode not yet compiled) on a 2-core machine.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")

app = typer.Typer(
    add_completion=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)
data_app = typer.Typer(help="get data: synthesize, import or download HAM10000")
registry_app = typer.Typer(help="the MLflow model registry: show, promote, rollback")
app.add_typer(data_app, name="data")
app.add_typer(registry_app, name="registry")

# --params and --set: every command takes them (a script may pass them to any), even one that reads no
# parameter. Then the options several commands share.
ParamsFile = Annotated[Path, typer.Option("--params", metavar="FILE", help="parameters file")]
Overrides = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        metavar="SECTION.KEY=VALUE",
        help="override one parameter for this run; repeatable (e.g. --set train.head_epochs=2)",
    ),
]
RawDir = Annotated[Path, typer.Option(help="the imported data (canonical raw layout)")]
ProcessedDir = Annotated[Path, typer.Option(help="the preprocessed splits")]
ModelDir = Annotated[Path, typer.Option(help="the model, its checkpoints and train.json")]
ReportsDir = Annotated[Path, typer.Option(help="metrics, figures and validation reports")]
SavedModelDir = Annotated[Path, typer.Option(help="for a saved-model path")]  # read only when --model is no URI
NoTracking = Annotated[bool, typer.Option("--no-tracking", help="do not log to MLflow")]
Force = Annotated[bool, typer.Option("--force", help="replace an existing import")]
NoDvc = Annotated[bool, typer.Option("--no-dvc", help="do not `dvc add` the imported data")]
SAVED_MODEL = str(paths.MODELS_DIR / "model.keras")
CHAMPION = "models:/skinrisk@champion"
REFERENCE_PROFILE = paths.MODELS_DIR / "reference_profile.parquet"

_verbose = False  # -v/--verbose, read by every command as it starts


@app.callback()
def skinrisk(
    verbose: Annotated[
        bool,
        typer.Option(
            "-v",
            "--verbose",
            help=f"also show library INFO lines and full tracebacks on the console (always in {paths.LOG_FILE})",
        ),
    ] = False,
) -> None:
    """Skin-cancer risk triage (low / moderate / high) from dermoscopic images and clinical metadata:
    data, training, evaluation and MLOps commands."""
    global _verbose
    _verbose = verbose


def _command(
    group: typer.Typer, name: str, *, stage: bool = False, tensorflow: bool = True, alias: str | None = None
) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Register a handler as the command ``name`` of ``group`` (its docstring is the help), run by :func:`_run`.

    ``stage``: a stage dvc.yaml runs; it holds the workspace lock on its folders while it runs, the
    lock the Prefect flow holds for its whole run (tasks/workspace_lock.py), so `dvc repro` and a flow
    never write the same folders at once; whichever comes second is refused at once.
    ``tensorflow=False``: the command never builds a model, and skips TensorFlow's import (seconds).
    """

    def register(handler: Callable[..., None]) -> Callable[..., None]:
        @functools.wraps(handler)
        def run(**options: Any) -> None:
            status = _run(handler, options, owner=f"skinrisk {name}", stage=stage, tensorflow=tensorflow)
            if status:
                raise typer.Exit(status)

        group.command(name)(run)
        if alias:
            group.command(alias, hidden=True)(run)
        return handler

    return register


_WORKSPACE_FOLDERS = ("processed_dir", "model_dir", "reports_dir")  # the options naming what a stage writes


def _run(handler: Callable[..., None], options: dict[str, Any], *, owner: str, stage: bool, tensorflow: bool) -> int:
    """Run a command's handler as every command runs: its lines on the console and all in the log,
    SIGTERM unwinding like Ctrl-C, a stage holding the workspace lock, TensorFlow imported first
    (its C++ notices to the log) unless the command builds no model. Returns the exit status;
    a failure is one line on stderr."""
    from tasks import console

    log_file = console.setup(verbose=_verbose)
    # SIGTERM (a scheduler or `kill` stopping the job) unwinds like Ctrl-C: outputs stay as they were,
    # the MLflow run is ended KILLED
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    where = f" (full log: {log_file})" if log_file else ""
    try:
        with contextlib.ExitStack() as stack:
            if stage:
                from tasks.workspace_lock import workspace_lock

                folders = [options[name] for name in _WORKSPACE_FOLDERS if options.get(name)]
                stack.enter_context(workspace_lock(folders, owner=owner))
            if tensorflow:
                console.import_tensorflow(log_file)
            handler(**options)
    except SkinriskError as exc:
        console.TRACEBACKS.error("error: %s", exc, exc_info=True)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        console.TRACEBACKS.error("error: %s", exc, exc_info=True)
        if isinstance(exc, OSError) and exc.filename:  # a path that cannot be read or written: the user's to fix
            print(
                f"error: cannot use {exc.filename}: {exc.strerror or exc}; check the path and its permissions, "
                f"or choose another location{where}",
                file=sys.stderr,
            )
            return 1
        # a bug, not bad input: the traceback is in the log (and on the console with -v)
        print(f"error: unexpected {type(exc).__name__}: {exc}{where}; please report it with that log", file=sys.stderr)
        return 1
    return 0


def _params(params_file: Path, overrides: list[str] | None) -> Params:
    from tasks.params import load_params

    return load_params(params_file, overrides)


def _tracked_run(model_dir: Path) -> str | None:
    """The MLflow run train.json names; None for a model trained with --no-tracking."""
    from tasks.runs import run_id_of

    try:
        return run_id_of(model_dir)
    except SkinriskError:
        return None


def _shap_background(processed_dir: Path, params: ExplainParams):
    """SHAP's background: training cases when preprocess ran here, else explain's neutral one (None)."""
    from tasks.schema import CASES_FILE
    from tasks.stages.explain import training_background

    if not (processed_dir / CASES_FILE).exists():
        return None
    return training_background(processed_dir, params.shap_background, params.seed)


@_command(data_app, "synth", tensorflow=False)
def cmd_data_synth(
    out: Annotated[Path | None, typer.Option(help=f"output folder (default: {paths.SYNTHETIC_DIR})")] = None,
    images: Annotated[int | None, typer.Option(help="number of images (default: data.synthetic_images)")] = None,
    seed: Annotated[int | None, typer.Option(help="random seed (default: data.synthetic_seed)")] = None,
    width: Annotated[int | None, typer.Option(help="image width in pixels (default: 600)")] = None,
    height: Annotated[int | None, typer.Option(help="image height in pixels (default: 450)")] = None,
    params_file: ParamsFile = paths.PARAMS_FILE,
    overrides: Overrides = None,
) -> None:
    """write a synthetic HAM10000-shaped sample (Kaggle layout)"""
    from tasks.synth import synthesize_ham10000

    params = _params(params_file, overrides).data
    out = out or paths.SYNTHETIC_DIR
    metadata = synthesize_ham10000(
        out,
        n_images=images or params.synthetic_images,
        seed=params.synthetic_seed if seed is None else seed,
        width=width or params.synthetic_width,
        height=height or params.synthetic_height,
    )
    counts = metadata["dx"].value_counts()
    print(
        f"wrote {len(metadata)} synthetic images of {metadata['lesion_id'].nunique()} lesions to {out} (Kaggle layout)"
    )
    for dx, count in counts.items():
        print(f"  {dx:<6}{count:>6}")


@_command(data_app, "import", tensorflow=False)
def cmd_data_import(
    source: Annotated[Path, typer.Argument(help="folder or .zip holding the metadata table and the images")],
    raw_dir: RawDir = paths.RAW_DIR,
    force: Force = False,
    no_dvc: NoDvc = False,
    params_file: ParamsFile = paths.PARAMS_FILE,
    overrides: Overrides = None,
) -> None:
    """import a HAM10000 folder or zip (Kaggle, Dataverse or flat layout) into data/raw"""
    from tasks.ingest import format_summary, import_dataset
    from tasks.versioning import track_with_dvc

    summary = import_dataset(source, raw_dir, force=force)
    print(format_summary(summary))
    if not no_dvc and track_with_dvc(raw_dir):
        print(f"DVC now tracks {raw_dir} (commit {raw_dir}.dvc to version this data)")


@_command(data_app, "download", tensorflow=False)
def cmd_data_download(
    dest: Annotated[Path, typer.Option(help="download folder")] = paths.DOWNLOAD_DIR,
    base_url: Annotated[str | None, typer.Option(help="Dataverse server (default: Harvard Dataverse)")] = None,
    no_import: Annotated[bool, typer.Option("--no-import", help="only download")] = False,
    raw_dir: RawDir = paths.RAW_DIR,
    force: Force = False,
    no_dvc: NoDvc = False,
    params_file: ParamsFile = paths.PARAMS_FILE,
    overrides: Overrides = None,
) -> None:
    """download HAM10000 from Harvard Dataverse (checksummed, resumable), then import it"""
    from tasks.download import DATAVERSE_URL, download_ham10000

    dest = download_ham10000(dest, base_url=base_url or DATAVERSE_URL)
    print(f"downloaded HAM10000 to {dest}")
    if not no_import:
        cmd_data_import(dest, raw_dir, force, no_dvc, params_file, overrides)


@_command(data_app, "ensure", tensorflow=False)
def cmd_data_ensure(
    raw_dir: RawDir = paths.RAW_DIR, params_file: ParamsFile = paths.PARAMS_FILE, overrides: Overrides = None
) -> None:
    """import the synthetic sample into data/raw unless data was imported already"""
    from tasks.ingest import ensure_imported

    source = ensure_imported(raw_dir, paths.SYNTHETIC_DIR, _params(params_file, overrides).data)
    print(f"{raw_dir} holds {source} data")


@_command(app, "validate", stage=True, tensorflow=False)
def cmd_validate(
    raw_dir: RawDir = paths.RAW_DIR,
    reports_dir: ReportsDir = paths.REPORTS_DIR,
    params_file: ParamsFile = paths.PARAMS_FILE,
    overrides: Overrides = None,
) -> None:
    """check the imported metadata and images (Great Expectations)"""
    from tasks.stages.validate import validate_raw

    summary = validate_raw(raw_dir, reports_dir, _params(params_file, overrides).validate_)
    print(
        f"validation passed: {summary.n_images} images of {summary.n_lesions} lesions, "
        f"{summary.evaluated} expectations; report in {summary.report_markdown}"
    )
    if summary.data_docs:
        print(f"Data Docs: {Path(summary.data_docs).resolve().as_uri()}")


@_command(app, "preprocess", stage=True, tensorflow=False)
def cmd_preprocess(
    raw_dir: RawDir = paths.RAW_DIR,
    processed_dir: Annotated[Path, typer.Option("--out", help="the preprocessed splits")] = paths.PROCESSED_DIR,
    reports_dir: ReportsDir = paths.REPORTS_DIR,
    params_file: ParamsFile = paths.PARAMS_FILE,
    overrides: Overrides = None,
) -> None:
    """risk labels, lesion-grouped splits, clinical encoding, decoded images"""
    from tasks.stages.preprocess import format_counts, preprocess
    from tasks.stages.validate import REPORT_JSON, require_validated

    require_validated(raw_dir, reports_dir / REPORT_JSON)

    summary = preprocess(raw_dir, processed_dir, _params(params_file, overrides).preprocess, reports_dir=reports_dir)
    print(
        f"preprocessed {summary.n_images} images to {processed_dir} "
        f"({summary.image_size}x{summary.image_size}, decoded in {summary.seconds_decoding:.1f} s)"
    )
    print(format_counts(summary))


@_command(app, "train", stage=True)
def cmd_train(
    raw_dir: RawDir = paths.RAW_DIR,
    processed_dir: ProcessedDir = paths.PROCESSED_DIR,
    model_dir: ModelDir = paths.MODELS_DIR,
    reports_dir: ReportsDir = paths.REPORTS_DIR,
    no_tracking: NoTracking = False,
    params_file: ParamsFile = paths.PARAMS_FILE,
    overrides: Overrides = None,
) -> None:
    """train the multimodal model (checkpointed, resumable), tracked in MLflow"""
    from tasks.stages.train import train

    params = _params(params_file, overrides)
    run_id = None
    if not no_tracking:
        from tasks.runs import start_pipeline_run
        from tasks.versioning import data_source

        run_id = start_pipeline_run(params, raw_dir, reports_dir, orchestrator="dvc", source=data_source(raw_dir))
    from tasks.tracking import working_on

    with working_on(run_id):
        result = train(processed_dir, model_dir, reports_dir, params.train, run_id=run_id)
    print(
        f"trained {result.epochs_run} epochs in {result.seconds:.0f} s; best {result.monitor} "
        f"{result.best_value:.4f} (epoch {result.best_epoch}); temperature {result.temperature:.2f}; "
        f"model in {result.model_path}" + (f"; MLflow run {run_id}" if run_id else "")
    )


@_command(app, "evaluate", stage=True)
def cmd_evaluate(
    raw_dir: RawDir = paths.RAW_DIR,
    processed_dir: ProcessedDir = paths.PROCESSED_DIR,
    model_dir: ModelDir = paths.MODELS_DIR,
    reports_dir: ReportsDir = paths.REPORTS_DIR,
    model: Annotated[str, typer.Option(help="saved model or MLflow URI (models:/skinrisk@champion)")] = SAVED_MODEL,
    data: Annotated[
        Path | None, typer.Option(help="external labelled dataset (folder or zip, any HAM10000 layout)")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="write the figures to this JSON file too")] = None,
    no_tracking: NoTracking = False,
    params_file: ParamsFile = paths.PARAMS_FILE,
    overrides: Overrides = None,
) -> None:
    """score the test split (default) or any labelled HAM10000-layout dataset (--data) with the same figures"""
    from tasks.scored_model import load_bundle
    from tasks.stages.evaluate import evaluate, evaluate_external, format_headline

    params = _params(params_file, overrides).evaluate
    if data:
        bundle = load_bundle(model, processed_dir, model_dir)
        out = out or Path("reports/external_metrics.json")
        metrics = evaluate_external(bundle, data, out, params)
        print(f"scored {metrics['n_images']} images of {data}; figures in {out}")
    else:
        from tasks.runs import run_id_of
        from tasks.tracking import working_on

        run_id = None if no_tracking else run_id_of(model_dir)
        with working_on(run_id):
            metrics = evaluate(Path(model), processed_dir, reports_dir, model_dir, params, run_id=run_id)
        if out:
            from tasks.atomic import write_json

            write_json(out, metrics)
    print(format_headline(metrics))


@_command(app, "register", stage=True)
def cmd_register(
    raw_dir: RawDir = paths.RAW_DIR,
    processed_dir: ProcessedDir = paths.PROCESSED_DIR,
    model_dir: ModelDir = paths.MODELS_DIR,
    reports_dir: ReportsDir = paths.REPORTS_DIR,
    model: Annotated[Path, typer.Option(help="the saved model")] = Path(SAVED_MODEL),
    params_file: ParamsFile = paths.PARAMS_FILE,
    overrides: Overrides = None,
) -> None:
    """log the model to its MLflow run and register it as @challenger"""
    from tasks.runs import run_id_of
    from tasks.stages.register import register
    from tasks.tracking import working_on

    run_id = run_id_of(model_dir)
    with working_on(run_id):
        registration = register(model, processed_dir, model_dir, reports_dir, run_id)
    print(
        f"registered {registration.name} version {registration.version} as @{registration.alias} ({registration.model_uri})"
    )


@_command(app, "explain", stage=True)
def cmd_explain(
    model: Annotated[str, typer.Option(help="saved model or MLflow URI")] = SAVED_MODEL,
    image: Annotated[Path | None, typer.Option(help="the lesion image of one case")] = None,
    age: Annotated[float | None, typer.Option(help="years; omit when unknown")] = None,
    sex: Annotated[str | None, typer.Option(help="male, female or unknown")] = None,
    site: Annotated[str | None, typer.Option(help="lesion localization, e.g. back")] = None,
    out: Annotated[Path, typer.Option(help="output folder")] = paths.REPORTS_DIR / "explain",
    processed_dir: ProcessedDir = paths.PROCESSED_DIR,
    model_dir: ModelDir = paths.MODELS_DIR,
    params_file: ParamsFile = paths.PARAMS_FILE,
    overrides: Overrides = None,
) -> None:
    """Grad-CAM and SHAP: one case (--image ...) or, without --image, chosen test cases into reports/explain"""
    params = _params(params_file, overrides).explain
    if image is None:
        from tasks.stages.explain import explain_test_cases
        from tasks.tracking import working_on

        run_id = _tracked_run(model_dir)
        with working_on(run_id):
            explain_test_cases(Path(model), processed_dir, out, params, run_id=run_id)
        print(f"explained test cases (Grad-CAM overlays, SHAP summary) in {out}")
        return
    from tasks.scored_model import load_bundle
    from tasks.stages.explain import explain_case

    if sex is None or site is None:
        raise SkinriskError("a single case needs --sex and --site (and --age unless it is unknown)")
    bundle = load_bundle(model, processed_dir, model_dir)
    background = _shap_background(processed_dir, params)
    result = explain_case(bundle, image, age, sex, site, out, params, background=background)
    import json

    print(json.dumps(result, indent=2, default=str))


@_command(app, "reference", stage=True, alias="monitor-reference")
def cmd_monitor_reference(
    model: Annotated[Path, typer.Option(help="the saved model")] = Path(SAVED_MODEL),
    processed_dir: ProcessedDir = paths.PROCESSED_DIR,
    raw_dir: RawDir = paths.RAW_DIR,
    model_dir: Annotated[Path, typer.Option(help="where train.json names the MLflow run")] = paths.MODELS_DIR,
    out: Annotated[Path, typer.Option(help="the reference profile")] = REFERENCE_PROFILE,
    params_file: ParamsFile = paths.PARAMS_FILE,
    overrides: Overrides = None,
) -> None:
    """build the training reference profile for drift monitoring (the dvc.yaml stage of that name)"""
    from tasks.stages.reference import build_reference_profile
    from tasks.tracking import working_on

    run_id = _tracked_run(model_dir)
    with working_on(run_id):
        out = build_reference_profile(
            model, processed_dir, out, _params(params_file, overrides).monitor, raw_dir=raw_dir, run_id=run_id
        )
    print(f"reference profile written to {out}")


@_command(app, "monitor")
def cmd_monitor(
    batch: Annotated[Path, typer.Option(help="HAM10000-layout folder or zip, or a cases CSV (with --images)")],
    images: Annotated[Path | None, typer.Option(help="folder of the cases CSV's images")] = None,
    reference: Annotated[Path, typer.Option(help="the training reference profile")] = REFERENCE_PROFILE,
    model: Annotated[str, typer.Option(help="saved model or MLflow URI")] = SAVED_MODEL,
    out: Annotated[Path, typer.Option(help="output folder")] = paths.REPORTS_DIR / "monitoring",
    no_tracking: NoTracking = False,
    no_retrain: Annotated[bool, typer.Option("--no-retrain", help="never trigger the retraining deployment")] = False,
    workspace: Annotated[
        Path, typer.Option(help="Evidently workspace that keeps every run (`evidently ui --workspace PATH`)")
    ] = paths.REPORTS_DIR / "evidently",
    no_workspace: Annotated[
        bool, typer.Option("--no-workspace", help="do not add the run to the Evidently workspace")
    ] = False,
    params_file: ParamsFile = paths.PARAMS_FILE,
    overrides: Overrides = None,
) -> None:
    """compare a batch of new cases with the training reference (Evidently)"""
    from flows.retraining import trigger_retraining
    from tasks.stages.monitor import format_drift_summary, monitor_batch, read_summary

    result = monitor_batch(
        reference,
        model,
        batch,
        out,
        _params(params_file, overrides).monitor,
        images_dir=images,
        track=not no_tracking,
        retrain=None if no_retrain else trigger_retraining,
        workspace=None if no_workspace else workspace,
    )
    print(format_drift_summary(read_summary(Path(result.summary_path))))
    print(f"report: {result.report_html}")
    if result.evidently:
        print(
            f"history: snapshot {result.evidently['snapshot_id']} added to Evidently project "
            f"{result.evidently['project']!r}; browse it with `evidently ui --workspace {result.evidently['workspace']}`"
        )


@_command(registry_app, "show")
def cmd_registry_show(params_file: ParamsFile = paths.PARAMS_FILE, overrides: Overrides = None) -> None:
    """list the versions of the skinrisk model with aliases and figures"""
    from tasks.stages.promote import registry_table

    table = registry_table()
    print(table.to_string(index=False) if len(table) else "no versions registered")


@_command(registry_app, "promote")
def cmd_registry_promote(
    processed_dir: Annotated[
        Path | None,
        typer.Option(
            help=f"the test split to score on; default: {paths.PROCESSED_DIR} (dvc repro), "
            f"else {paths.PREFECT_PROCESSED_DIR} (make run)"
        ),
    ] = None,
    raw_dir: RawDir = paths.RAW_DIR,
    out: Annotated[
        Path | None,
        typer.Option(help="also write the decision as JSON to this file (dvc.yaml: reports/promotion.json)"),
    ] = None,
    params_file: ParamsFile = paths.PARAMS_FILE,
    overrides: Overrides = None,
) -> None:
    """gate @challenger against @champion on the same test cases; move @champion if every gate passes"""
    from tasks.atomic import write_json
    from tasks.stages.promote import decision_record, promote

    params = _params(params_file, overrides)
    decision = promote(
        processed_dir or paths.latest_processed_dir(),
        raw_dir,
        params.promote,
        calibration_bins=params.evaluate.calibration_bins,
    )
    print(decision.summary())
    if out:
        write_json(out, decision_record(decision))


@_command(registry_app, "rollback")
def cmd_registry_rollback(params_file: ParamsFile = paths.PARAMS_FILE, overrides: Overrides = None) -> None:
    """point @champion back at @previous"""
    from tasks.stages.promote import rollback

    demoted, restored = rollback()
    print(f"@champion rolled back from version {demoted} to version {restored}")


@_command(app, "model-card", tensorflow=False)
def cmd_model_card(
    model: Annotated[
        str,
        typer.Option(
            help="models:/skinrisk@champion, models:/skinrisk/3, or a saved model (.keras: its card from "
            "reports/metrics.json and data/processed)"
        ),
    ] = CHAMPION,
    out: Annotated[
        Path | None, typer.Option(help="write the card (Markdown) to this file instead of printing it")
    ] = None,
    raw_dir: RawDir = paths.RAW_DIR,
    processed_dir: ProcessedDir = paths.PROCESSED_DIR,
    model_dir: ModelDir = paths.MODELS_DIR,
    reports_dir: ReportsDir = paths.REPORTS_DIR,
    params_file: ParamsFile = paths.PARAMS_FILE,
    overrides: Overrides = None,
) -> None:
    """print the model card of a registered version (or render one for a local .keras model)"""
    if model.startswith("models:/"):
        from tasks.stages.register import registered_card

        card = registered_card(model)
    elif model.endswith(".keras"):
        from tasks.model_card import local_model_card
        from tasks.paths import TRAIN_INFO_FILE
        from tasks.versioning import data_source, data_version

        card = local_model_card(
            Path(model),
            reports_dir / paths.METRICS_FILE,
            processed_dir,
            model_dir / TRAIN_INFO_FILE,
            _params(params_file, overrides).train.model_dump(mode="json"),
            data_version(raw_dir),
            data_source(raw_dir),
        )
    else:
        raise SkinriskError(
            f"{model!r} is neither a registered model nor a .keras file: give models:/skinrisk@champion, "
            "models:/skinrisk/3 or a saved model such as models/model.keras"
        )
    if out:
        from tasks.atomic import write_text

        write_text(out, card)
        print(f"model card of {model} written to {out}")
    else:
        print(card, end="")


@_command(app, "triage")
def cmd_triage(
    cases: Annotated[Path, typer.Option(help="CSV with columns image, age, sex, localization")],
    images: Annotated[Path, typer.Option(help="folder the image column is relative to")],
    out: Annotated[Path, typer.Option(help="the ranked queue (CSV)")],
    model: Annotated[str, typer.Option(help="MLflow URI or saved model")] = CHAMPION,
    workers: Annotated[int, typer.Option(help="processes checking and decoding the rows (0: one per core)")] = 1,
    executor: Annotated[
        Literal["processes", "threads", "dask"],
        typer.Option(
            help="where the row shards run: local processes or threads, or a Dask cluster (the queue is the same)"
        ),
    ] = "processes",
    dask_address: Annotated[
        str, typer.Option(help="with --executor dask: a scheduler (tcp://HOST:8786); empty: a local cluster")
    ] = "",
    processed_dir: SavedModelDir = paths.PROCESSED_DIR,
    model_dir: SavedModelDir = paths.MODELS_DIR,
    params_file: ParamsFile = paths.PARAMS_FILE,
    overrides: Overrides = None,
) -> None:
    """rank a batch of new cases by risk, with the recommended action"""
    from tasks.scored_model import load_bundle
    from tasks.triage import triage

    bundle = load_bundle(model, processed_dir, model_dir)
    summary = triage(bundle, cases, images, out, executor=executor, workers=workers, dask_address=dask_address)
    print(
        f"scored {summary.n_scored} of {summary.n_cases} cases in {summary.seconds_scoring:.1f} s: "
        f"{summary.n_referred} referred; queue in {summary.queue_path}"
    )
    if summary.invalid_path:
        import pandas as pd

        print(f"{summary.n_invalid} invalid row(s), not scored (also in {summary.invalid_path}):")
        for row in pd.read_csv(summary.invalid_path).itertuples():
            print(f"  line {row.row} ({row.image}): {row.reason}")


@_command(app, "serve")
def cmd_serve(
    model: Annotated[str, typer.Option(help="MLflow model URI")] = CHAMPION,
    host: Annotated[str, typer.Option(help="the address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="the port to listen on")] = 5001,
    params_file: ParamsFile = paths.PARAMS_FILE,
    overrides: Overrides = None,
) -> None:
    """the scoring server (MLflow's) for a registered model; bad requests answered without quoting them back"""
    import uvicorn

    from tasks.serving import scoring_app
    from tasks.stages.register import load_registered

    scorer = scoring_app(load_registered(model))
    print(f"scoring {model} on http://{host}:{port}/invocations (Ctrl-C stops)")
    uvicorn.run(scorer, host=host, port=port, log_level="warning")


@_command(app, "app")
def cmd_app(
    model: Annotated[str, typer.Option(help="MLflow URI or saved model")] = CHAMPION,
    processed_dir: SavedModelDir = paths.PROCESSED_DIR,
    model_dir: SavedModelDir = paths.MODELS_DIR,
    host: Annotated[str, typer.Option(help="the page has no login: keep it local")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="the port to listen on")] = 8080,
    queue: Annotated[
        Path | None, typer.Option(help="a triage queue CSV (`skinrisk triage --out`) shown at /queue")
    ] = None,
    images: Annotated[Path | None, typer.Option(help="the folder the queue's image column is relative to")] = None,
    params_file: ParamsFile = paths.PARAMS_FILE,
    overrides: Overrides = None,
) -> None:
    """the triage page for clinicians: score and explain one case, open a triage queue (web, loopback)"""
    from tasks.app import serve
    from tasks.scored_model import load_bundle

    params = _params(params_file, overrides).explain
    bundle = load_bundle(model, processed_dir, model_dir)
    background = _shap_background(processed_dir, params)
    print(f"triage page for {model} on http://{host}:{port}/ (Ctrl-C stops)")
    serve(bundle, params, host=host, port=port, background=background, queue=queue, images_dir=images, model_name=model)


@_command(app, "pipeline")
def cmd_pipeline(params_file: ParamsFile = paths.PARAMS_FILE, overrides: Overrides = None) -> None:
    """the main job: the Prefect training flow on the imported data, or on the synthetic sample when none is imported"""
    from flows.retraining import retraining_flow
    from tasks.stages.evaluate import format_headline
    from tasks.tracking import tracking_uri

    # The training flow, then the promotion gate: the default path ends with an @champion when the
    # model passes the gates, so the serving, triage and explain commands work as written.
    both = retraining_flow(params_file=str(params_file), overrides=list(overrides or []))
    result, decision = both["training"], both["promotion"]
    import json

    metrics = json.loads((paths.PREFECT_REPORTS_DIR / paths.METRICS_FILE).read_text())
    print(f"\nskinrisk pipeline done on the {result['data']} data; MLflow run {result['run_id']}")
    print(format_headline(metrics))
    if result["data"] == "synthetic":
        print(
            "  (the synthetic sample has a planted, easy class signal: these figures show that the pipeline\n"
            "   works, not how good the model is on real lesions; import HAM10000 for those)"
        )
    print(f"model registered as {result['model_uri']} (alias @challenger)")
    if decision["promoted"]:
        print(f"promotion gates passed: version {decision['challenger_version']} is models:/skinrisk@champion")
    else:
        print("promotion gates not passed; @champion unchanged:")
        print("\n".join(f"  {reason}" for reason in decision["reasons"] if reason.startswith("FAIL")))
    print(
        f"reports: {paths.PREFECT_REPORTS_DIR}/ (metrics.json, confusion_matrix.png, reliability.png, training_curves.png);"
        " Prefect runs work there, DVC's outputs stay as `dvc repro` left them"
    )
    print(f"open the MLflow UI:  .venv/bin/mlflow ui --backend-store-uri {tracking_uri()}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    try:
        status = typer.main.get_command(app).main(argv, prog_name="skinrisk", standalone_mode=False)
    except typer.TyperException as exc:  # a usage error: Click's usage line and message, status 2
        exc.show()
        return exc.exit_code
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
