"""The ``skinrisk`` command line: one subcommand per pipeline stage, all sharing --params/--set.

Heavy libraries (TensorFlow, Prefect, MLflow) are imported inside the command that needs them,
so ``skinrisk --help`` and the data commands start quickly. Even the params (pydantic) wait for a
command: a spawned worker process re-imports this module as its main module, and should not pay
0.2 s for what it never uses.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from tasks import paths
from tasks.errors import SkinriskError

if TYPE_CHECKING:
    from tasks.params import Params

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# Prefect's in-process API server gets 20 s to start by default: too little for a cold first run
# (fresh venv, bytecode not yet compiled) on a 2-core machine.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")


def _params(args: argparse.Namespace) -> Params:
    from tasks.params import load_params

    return load_params(args.params, args.set)


def cmd_data_synth(args: argparse.Namespace) -> None:
    from tasks.synth import synthesize_ham10000

    params = _params(args).data
    out = args.out or paths.SYNTHETIC_DIR
    metadata = synthesize_ham10000(
        Path(out),
        n_images=args.images or params.synthetic_images,
        seed=params.synthetic_seed if args.seed is None else args.seed,
        width=args.width or params.synthetic_width,
        height=args.height or params.synthetic_height,
    )
    counts = metadata["dx"].value_counts()
    print(
        f"wrote {len(metadata)} synthetic images of {metadata['lesion_id'].nunique()} lesions to {out} (Kaggle layout)"
    )
    for dx, count in counts.items():
        print(f"  {dx:<6}{count:>6}")


def cmd_data_import(args: argparse.Namespace) -> None:
    from tasks.ingest import format_summary, import_dataset
    from tasks.versioning import track_with_dvc

    summary = import_dataset(Path(args.source), Path(args.raw_dir), force=args.force)
    print(format_summary(summary))
    if not args.no_dvc and track_with_dvc(Path(args.raw_dir)):
        print(f"DVC now tracks {args.raw_dir} (commit {args.raw_dir}.dvc to version this data)")


def cmd_data_ensure(args: argparse.Namespace) -> None:
    from tasks.ingest import ensure_imported

    source = ensure_imported(Path(args.raw_dir), paths.SYNTHETIC_DIR, _params(args).data)
    print(f"{args.raw_dir} holds {source} data")


def cmd_data_download(args: argparse.Namespace) -> None:
    from tasks.download import DATAVERSE_URL, download_ham10000

    dest = download_ham10000(Path(args.dest), base_url=args.base_url or DATAVERSE_URL)
    print(f"downloaded HAM10000 to {dest}")
    if not args.no_import:
        args.source = str(dest)
        cmd_data_import(args)


def cmd_validate(args: argparse.Namespace) -> None:
    from tasks.validate import validate_raw

    summary = validate_raw(Path(args.raw_dir), Path(args.reports_dir), _params(args).validate_)
    print(
        f"validation passed: {summary.n_images} images of {summary.n_lesions} lesions, "
        f"{summary.evaluated} expectations; report in {summary.report_markdown}"
    )
    if summary.data_docs:
        print(f"Data Docs: {Path(summary.data_docs).resolve().as_uri()}")


def cmd_preprocess(args: argparse.Namespace) -> None:
    from tasks.preprocess import format_counts, preprocess
    from tasks.validate import REPORT_JSON, require_validated

    require_validated(Path(args.raw_dir), Path(args.reports_dir) / REPORT_JSON)

    summary = preprocess(
        Path(args.raw_dir),
        Path(args.processed_dir),
        _params(args).preprocess,
        reports_dir=Path(args.reports_dir),
    )
    print(
        f"preprocessed {summary.n_images} images to {args.processed_dir} "
        f"({summary.image_size}x{summary.image_size}, decoded in {summary.seconds_decoding:.1f} s)"
    )
    print(format_counts(summary))


def cmd_train(args: argparse.Namespace) -> None:
    from tasks.train import train

    params = _params(args)
    run_id = None
    if not args.no_tracking:
        from tasks.runs import start_pipeline_run
        from tasks.versioning import data_source

        run_id = start_pipeline_run(
            params,
            Path(args.raw_dir),
            Path(args.reports_dir),
            orchestrator="dvc",
            source=data_source(Path(args.raw_dir)),
        )
    from tasks.tracking import working_on

    with working_on(run_id):
        result = train(
            Path(args.processed_dir),
            Path(args.model_dir),
            Path(args.reports_dir),
            params.train,
            run_id=run_id,
        )
    print(
        f"trained {result.epochs_run} epochs in {result.seconds:.0f} s; best {result.monitor} "
        f"{result.best_value:.4f} (epoch {result.best_epoch}); temperature {result.temperature:.2f}; "
        f"model in {result.model_path}" + (f"; MLflow run {run_id}" if run_id else "")
    )


def cmd_evaluate(args: argparse.Namespace) -> None:
    from tasks.evaluate import evaluate, evaluate_external, format_headline
    from tasks.scored_model import load_bundle

    params = _params(args).evaluate
    if args.data:
        bundle = load_bundle(args.model, Path(args.processed_dir), Path(args.model_dir))
        out = Path(args.out or "reports/external_metrics.json")
        metrics = evaluate_external(bundle, Path(args.data), out, params)
        print(f"scored {metrics['n_images']} images of {args.data}; figures in {out}")
    else:
        from tasks.runs import run_id_of
        from tasks.tracking import working_on

        run_id = None if args.no_tracking else run_id_of(Path(args.model_dir))
        with working_on(run_id):
            metrics = evaluate(
                Path(args.model),
                Path(args.processed_dir),
                Path(args.reports_dir),
                Path(args.model_dir),
                params,
                run_id=run_id,
            )
        if args.out:
            from tasks.atomic import write_json

            write_json(Path(args.out), metrics)
    print(format_headline(metrics))


def cmd_register(args: argparse.Namespace) -> None:
    from tasks.runs import register_pipeline_model, run_id_of
    from tasks.tracking import working_on

    run_id = run_id_of(Path(args.model_dir))
    with working_on(run_id):
        registration = register_pipeline_model(
            Path(args.model), Path(args.processed_dir), Path(args.model_dir), Path(args.reports_dir), run_id
        )
    print(
        f"registered {registration.name} version {registration.version} as @{registration.alias} ({registration.model_uri})"
    )


def cmd_explain(args: argparse.Namespace) -> None:
    params = _params(args).explain
    if args.image is None:
        from tasks.explain import explain_test_cases
        from tasks.runs import run_id_of

        try:
            run_id = run_id_of(Path(args.model_dir))
        except SkinriskError:
            run_id = None  # a model trained without tracking
        from tasks.tracking import working_on

        with working_on(run_id):
            explain_test_cases(Path(args.model), Path(args.processed_dir), Path(args.out), params, run_id=run_id)
        print(f"explained test cases (Grad-CAM overlays, SHAP summary) in {args.out}")
        return
    from tasks.explain import explain_case, training_background
    from tasks.scored_model import load_bundle

    if args.sex is None or args.site is None:
        raise SkinriskError("a single case needs --sex and --site (and --age unless it is unknown)")
    bundle = load_bundle(args.model, Path(args.processed_dir), Path(args.model_dir))
    cases = Path(args.processed_dir) / "cases.csv"
    background = (
        training_background(Path(args.processed_dir), params.shap_background, params.seed) if cases.exists() else None
    )
    result = explain_case(
        bundle, Path(args.image), args.age, args.sex, args.site, Path(args.out), params, background=background
    )
    import json

    print(json.dumps(result, indent=2, default=str))


def cmd_monitor_reference(args: argparse.Namespace) -> None:
    from tasks.monitor import build_reference_profile
    from tasks.runs import run_id_of
    from tasks.tracking import working_on

    try:
        run_id = run_id_of(Path(args.model_dir))
    except SkinriskError:
        run_id = None  # a model trained without tracking
    with working_on(run_id):
        out = build_reference_profile(
            Path(args.model),
            Path(args.processed_dir),
            Path(args.out),
            _params(args).monitor,
            raw_dir=Path(args.raw_dir),
            run_id=run_id,
        )
    print(f"reference profile written to {out}")


def cmd_monitor(args: argparse.Namespace) -> None:
    from tasks.monitor import format_drift_summary, monitor_batch, read_summary

    result = monitor_batch(
        Path(args.reference),
        args.model,
        Path(args.batch),
        Path(args.out),
        _params(args).monitor,
        images_dir=Path(args.images) if args.images else None,
        track=not args.no_tracking,
        retrain=not args.no_retrain,
        workspace=None if args.no_workspace else Path(args.workspace),
    )
    print(format_drift_summary(read_summary(Path(result.summary_path))))
    print(f"report: {result.report_html}")
    if result.evidently:
        print(
            f"history: snapshot {result.evidently['snapshot_id']} added to Evidently project "
            f"{result.evidently['project']!r}; browse it with `evidently ui --workspace {result.evidently['workspace']}`"
        )


def cmd_registry_show(args: argparse.Namespace) -> None:
    from tasks.promote import registry_table

    table = registry_table()
    print(table.to_string(index=False) if len(table) else "no versions registered")


def cmd_registry_promote(args: argparse.Namespace) -> None:
    from tasks.atomic import write_json
    from tasks.promote import decision_record, promote

    params = _params(args)
    decision = promote(
        Path(args.processed_dir),
        Path(args.raw_dir),
        params.promote,
        calibration_bins=params.evaluate.calibration_bins,
    )
    print(decision.summary())
    if args.out:
        write_json(Path(args.out), decision_record(decision))


def cmd_registry_rollback(args: argparse.Namespace) -> None:
    from tasks.promote import rollback

    demoted, restored = rollback()
    print(f"@champion rolled back from version {demoted} to version {restored}")


def cmd_serve(args: argparse.Namespace) -> None:
    import uvicorn

    from tasks.register import load_registered
    from tasks.serving import scoring_app

    app = scoring_app(load_registered(args.model))
    print(f"scoring {args.model} on http://{args.host}:{args.port}/invocations (Ctrl-C stops)")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


def cmd_triage(args: argparse.Namespace) -> None:
    from tasks.scored_model import load_bundle
    from tasks.triage import triage

    bundle = load_bundle(args.model, Path(args.processed_dir), Path(args.model_dir))
    summary = triage(
        bundle,
        Path(args.cases),
        Path(args.images),
        Path(args.out),
        executor=args.executor,
        workers=args.workers,
        dask_address=args.dask_address,
    )
    print(
        f"scored {summary.n_scored} of {summary.n_cases} cases in {summary.seconds_scoring:.1f} s: "
        f"{summary.n_referred} referred; queue in {summary.queue_path}"
    )
    if summary.invalid_path:
        import pandas as pd

        print(f"{summary.n_invalid} invalid row(s), not scored (also in {summary.invalid_path}):")
        for row in pd.read_csv(summary.invalid_path).itertuples():
            print(f"  line {row.row} ({row.image}): {row.reason}")


def cmd_pipeline(args: argparse.Namespace) -> None:
    from flows.retraining import retraining_flow
    from tasks.evaluate import format_headline
    from tasks.tracking import tracking_uri

    # The training flow, then the promotion gate: the default path ends with an @champion when the
    # model passes the gates, so the serving, triage and explain commands work as written.
    both = retraining_flow(params_file=str(args.params), overrides=list(args.set or []))
    result, decision = both["training"], both["promotion"]
    import json

    metrics = json.loads((paths.REPORTS_DIR / "metrics.json").read_text())
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
    print(f"reports: {paths.REPORTS_DIR}/ (metrics.json, confusion_matrix.png, reliability.png, training_curves.png)")
    print(f"open the MLflow UI:  .venv/bin/mlflow ui --backend-store-uri {tracking_uri()}")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--params",
        default=str(paths.PARAMS_FILE),
        metavar="FILE",
        help="parameters file (default: %(default)s)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one parameter for this run; repeatable (e.g. --set train.head_epochs=2)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="skinrisk",
        description="Skin-cancer risk triage (low / moderate / high) from dermoscopic images and "
        "clinical metadata: data, training, evaluation and MLOps commands.",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help=f"also show library INFO lines and full tracebacks on the console (always in {paths.LOG_FILE})",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(
        name: str, handler: Callable, help_text: str, parent=commands, aliases: Sequence[str] = ()
    ) -> argparse.ArgumentParser:
        sub = parent.add_parser(name, help=help_text, description=help_text, aliases=list(aliases))
        _common(sub)
        sub.set_defaults(handler=handler)
        return sub

    data = commands.add_parser("data", help="get data: synthesize, import or download HAM10000")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")

    synth = add(
        "synth",
        cmd_data_synth,
        "write a synthetic HAM10000-shaped sample (Kaggle layout)",
        data_commands,
    )
    synth.add_argument("--out", default=None, help=f"output folder (default: {paths.SYNTHETIC_DIR})")
    synth.add_argument("--images", type=int, default=None, help="number of images (default: data.synthetic_images)")
    synth.add_argument("--seed", type=int, default=None, help="random seed (default: data.synthetic_seed)")
    synth.add_argument("--width", type=int, default=None, help="image width in pixels (default: 600)")
    synth.add_argument("--height", type=int, default=None, help="image height in pixels (default: 450)")

    for name, handler, text in (
        (
            "import",
            cmd_data_import,
            "import a HAM10000 folder or zip (Kaggle, Dataverse or flat layout) into data/raw",
        ),
        (
            "download",
            cmd_data_download,
            "download HAM10000 from Harvard Dataverse (checksummed, resumable), then import it",
        ),
    ):
        sub = add(name, handler, text, data_commands)
        if name == "import":
            sub.add_argument("source", help="folder or .zip holding the metadata table and the images")
        else:
            sub.add_argument(
                "--dest",
                default=str(paths.DOWNLOAD_DIR),
                help="download folder (default: %(default)s)",
            )
            sub.add_argument("--base-url", default=None, help="Dataverse server (default: Harvard Dataverse)")
            sub.add_argument("--no-import", action="store_true", help="only download")
        sub.add_argument(
            "--raw-dir",
            default=str(paths.RAW_DIR),
            help="canonical raw layout (default: %(default)s)",
        )
        sub.add_argument("--force", action="store_true", help="replace an existing import")
        sub.add_argument("--no-dvc", action="store_true", help="do not `dvc add` the imported data")

    ensure = add(
        "ensure",
        cmd_data_ensure,
        "import the synthetic sample into data/raw unless data was imported already",
        data_commands,
    )
    ensure.add_argument("--raw-dir", default=str(paths.RAW_DIR), help="default: %(default)s")

    validate = add("validate", cmd_validate, "check the imported metadata and images (Great Expectations)")
    validate.add_argument("--raw-dir", default=str(paths.RAW_DIR), help="default: %(default)s")
    validate.add_argument("--reports-dir", default=str(paths.REPORTS_DIR), help="default: %(default)s")

    prep = add(
        "preprocess",
        cmd_preprocess,
        "risk labels, lesion-grouped splits, clinical encoding, decoded images",
    )
    prep.add_argument("--raw-dir", default=str(paths.RAW_DIR), help="default: %(default)s")
    prep.add_argument("--out", dest="processed_dir", default=str(paths.PROCESSED_DIR), help="default: %(default)s")
    prep.add_argument("--reports-dir", default=str(paths.REPORTS_DIR), help="default: %(default)s")

    def stage_paths(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--raw-dir", default=str(paths.RAW_DIR), help="default: %(default)s")
        sub.add_argument("--processed-dir", default=str(paths.PROCESSED_DIR), help="default: %(default)s")
        sub.add_argument("--model-dir", default=str(paths.MODELS_DIR), help="default: %(default)s")
        sub.add_argument("--reports-dir", default=str(paths.REPORTS_DIR), help="default: %(default)s")

    train = add(
        "train",
        cmd_train,
        "train the multimodal model (checkpointed, resumable), tracked in MLflow",
    )
    stage_paths(train)
    train.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")

    evaluate = add(
        "evaluate",
        cmd_evaluate,
        "score the test split (default) or any labelled HAM10000-layout dataset (--data) with the same figures",
    )
    stage_paths(evaluate)
    evaluate.add_argument(
        "--model",
        default=str(paths.MODELS_DIR / "model.keras"),
        help="saved model or MLflow URI (models:/skinrisk@champion)",
    )
    evaluate.add_argument(
        "--data",
        default=None,
        help="external labelled dataset (folder or zip, any HAM10000 layout)",
    )
    evaluate.add_argument("--out", default=None, help="write the figures to this JSON file too")
    evaluate.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")

    register = add("register", cmd_register, "log the model to its MLflow run and register it as @challenger")
    stage_paths(register)
    register.add_argument("--model", default=str(paths.MODELS_DIR / "model.keras"), help="default: %(default)s")

    explain = add(
        "explain",
        cmd_explain,
        "Grad-CAM and SHAP: one case (--image ...) or, without --image, chosen test cases into reports/explain",
    )
    explain.add_argument("--model", default=str(paths.MODELS_DIR / "model.keras"), help="saved model or MLflow URI")
    explain.add_argument("--image", default=None, help="the lesion image of one case")
    explain.add_argument("--age", type=float, default=None, help="years; omit when unknown")
    explain.add_argument("--sex", default=None, help="male, female or unknown")
    explain.add_argument("--site", default=None, help="lesion localization, e.g. back")
    explain.add_argument(
        "--out", default=str(paths.REPORTS_DIR / "explain"), help="output folder (default: %(default)s)"
    )
    explain.add_argument("--processed-dir", default=str(paths.PROCESSED_DIR), help="default: %(default)s")
    explain.add_argument("--model-dir", default=str(paths.MODELS_DIR), help="default: %(default)s")

    reference = add(
        "reference",
        cmd_monitor_reference,
        "build the training reference profile for drift monitoring (the dvc.yaml stage of that name)",
        aliases=["monitor-reference"],
    )
    reference.add_argument("--model", default=str(paths.MODELS_DIR / "model.keras"), help="default: %(default)s")
    reference.add_argument("--processed-dir", default=str(paths.PROCESSED_DIR), help="default: %(default)s")
    reference.add_argument("--raw-dir", default=str(paths.RAW_DIR), help="default: %(default)s")
    reference.add_argument(
        "--model-dir", default=str(paths.MODELS_DIR), help="where train.json names the MLflow run; default: %(default)s"
    )
    reference.add_argument(
        "--out", default=str(paths.MODELS_DIR / "reference_profile.parquet"), help="default: %(default)s"
    )

    monitor = add("monitor", cmd_monitor, "compare a batch of new cases with the training reference (Evidently)")
    monitor.add_argument("--batch", required=True, help="HAM10000-layout folder or zip, or a cases CSV (with --images)")
    monitor.add_argument("--images", default=None, help="folder of the cases CSV's images")
    monitor.add_argument(
        "--reference", default=str(paths.MODELS_DIR / "reference_profile.parquet"), help="default: %(default)s"
    )
    monitor.add_argument("--model", default=str(paths.MODELS_DIR / "model.keras"), help="saved model or MLflow URI")
    monitor.add_argument("--out", default=str(paths.REPORTS_DIR / "monitoring"), help="default: %(default)s")
    monitor.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    monitor.add_argument("--no-retrain", action="store_true", help="never trigger the retraining deployment")
    monitor.add_argument(
        "--workspace",
        default=str(paths.REPORTS_DIR / "evidently"),
        help="Evidently workspace that keeps every run (`evidently ui --workspace PATH`); default: %(default)s",
    )
    monitor.add_argument("--no-workspace", action="store_true", help="do not add the run to the Evidently workspace")

    registry = commands.add_parser("registry", help="the MLflow model registry: show, promote, rollback")
    registry_commands = registry.add_subparsers(dest="registry_command", required=True, metavar="COMMAND")
    add(
        "show", cmd_registry_show, "list the versions of the skinrisk model with aliases and figures", registry_commands
    )
    promote = add(
        "promote",
        cmd_registry_promote,
        "gate @challenger against @champion on the same test cases; move @champion if every gate passes",
        registry_commands,
    )
    promote.add_argument("--processed-dir", default=str(paths.PROCESSED_DIR), help="default: %(default)s")
    promote.add_argument("--raw-dir", default=str(paths.RAW_DIR), help="default: %(default)s")
    promote.add_argument(
        "--out", help="also write the decision as JSON to this file (dvc.yaml: reports/promotion.json)"
    )
    add("rollback", cmd_registry_rollback, "point @champion back at @previous", registry_commands)

    triage_cmd = add("triage", cmd_triage, "rank a batch of new cases by risk, with the recommended action")
    triage_cmd.add_argument(
        "--model", default="models:/skinrisk@champion", help="MLflow URI or saved model (default: %(default)s)"
    )
    triage_cmd.add_argument("--cases", required=True, help="CSV with columns image, age, sex, localization")
    triage_cmd.add_argument("--images", required=True, help="folder the image column is relative to")
    triage_cmd.add_argument("--out", required=True, help="the ranked queue (CSV)")
    triage_cmd.add_argument(
        "--workers", type=int, default=1, help="processes checking and decoding the rows (0: one per core; default 1)"
    )
    triage_cmd.add_argument(
        "--executor",
        choices=["processes", "threads", "dask"],
        default="processes",
        help="where the row shards run: local processes or threads, or a Dask cluster (the queue is the same)",
    )
    triage_cmd.add_argument(
        "--dask-address", default="", help="with --executor dask: a scheduler (tcp://HOST:8786); empty: a local cluster"
    )
    triage_cmd.add_argument("--processed-dir", default=str(paths.PROCESSED_DIR), help="for a saved-model path")
    triage_cmd.add_argument("--model-dir", default=str(paths.MODELS_DIR), help="for a saved-model path")

    serve = add(
        "serve",
        cmd_serve,
        "the scoring server (MLflow's) for a registered model; bad requests answered without quoting them back",
    )
    serve.add_argument("--model", default="models:/skinrisk@champion", help="MLflow model URI (default: %(default)s)")
    serve.add_argument("--host", default="127.0.0.1", help="default: %(default)s")
    serve.add_argument("--port", type=int, default=5001, help="default: %(default)s")

    add(
        "pipeline",
        cmd_pipeline,
        "the main job: the Prefect training flow on the imported data, or on the synthetic sample when none is imported",
    )
    return parser


# The stages dvc.yaml runs: each holds the workspace lock on its folders while it runs, the lock
# the Prefect flow holds for its whole run (tasks/workspace_lock.py), so `dvc repro` and a flow
# never write the same folders at once; whichever comes second is refused at once.
_STAGES = {cmd_validate, cmd_preprocess, cmd_train, cmd_evaluate, cmd_register, cmd_explain, cmd_monitor_reference}
_WORKSPACE_FOLDERS = ("processed_dir", "model_dir", "reports_dir")

# Commands that never build a model: they skip TensorFlow's import (several seconds).
_WITHOUT_TENSORFLOW = {
    cmd_data_synth,
    cmd_data_import,
    cmd_data_ensure,
    cmd_data_download,
    cmd_validate,
    cmd_preprocess,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from tasks import console

    log_file = console.setup(verbose=args.verbose)
    # SIGTERM (a scheduler or `kill` stopping the job) unwinds like Ctrl-C: outputs stay as they were,
    # the MLflow run is ended KILLED
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    where = f" (full log: {log_file})" if log_file else ""
    try:
        with contextlib.ExitStack() as stack:
            if args.handler in _STAGES:
                from tasks.workspace_lock import workspace_lock

                folders = [getattr(args, name) for name in _WORKSPACE_FOLDERS if getattr(args, name, None)]
                stack.enter_context(workspace_lock(folders, owner=f"skinrisk {args.command}"))
            if args.handler not in _WITHOUT_TENSORFLOW:
                console.import_tensorflow(log_file)
            args.handler(args)
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


if __name__ == "__main__":
    sys.exit(main())
