"""Monitoring: does a new batch of cases still look like the data the model was trained on?

:func:`monitor_batch` describes a batch (HAM10000 layout, or a cases CSV beside its images; no
labels needed) as :mod:`tasks.drift_profile` describes the training reference, runs an Evidently
data-drift report against it, records it (``drift_report.html``/``.json``, ``drift_summary.json``,
a snapshot in a local Evidently workspace with a drift dashboard, a run in the MLflow experiment
``skinrisk-monitoring``) and, when the share of drifted columns reaches ``monitor.drift_share``,
calls the retraining trigger it was given (``flows.retraining.trigger_retraining``).

Batches are tested one image per lesion where lesion ids are known, like the reference: images of
one lesion are not independent cases. Drift tests, per column, at ``monitor.stattest_threshold``
(a p-value): two-sample Kolmogorov-Smirnov for numerical columns and a two-sample chi-square test
of homogeneity for categorical ones (Evidently's own ``chisquare`` treats the reference as exact,
so a single case of a body site absent from the reference would count as drift).
"""

from __future__ import annotations

import functools
import html
import json
import math
import tempfile
import uuid
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tasks.atomic import write_json, write_text
from tasks.clinical import parse_age
from tasks.drift_profile import (
    CATEGORICAL_COLUMNS,
    CLINICAL_COLUMNS,
    GROUPS,
    SIZE_COLUMNS,
    ReferenceProfile,
    image_statistics,
    model_fingerprint,
    model_outputs,
    one_per_lesion,
    original_sizes,
    profile_table,
)
from tasks.errors import DataError, SkinriskError
from tasks.params import MonitorParams
from tasks.schema import LOCALIZATIONS, SEXES
from tasks.scored_model import Bundle, is_model_uri, json_safe, load_bundle

MONITORING_EXPERIMENT = "skinrisk-monitoring"
REPORT_HTML = "drift_report.html"
REPORT_JSON = "drift_report.json"
SUMMARY_FILE = "drift_summary.json"
EVIDENTLY_PROJECT = "skinrisk"
DASHBOARD_TAB = "Drift over time"
# Columns whose drift the dashboard follows one by one: one of each group.
DASHBOARD_COLUMNS: dict[str, str] = {
    "age": "age",
    "brightness": "image brightness",
    "embedding_pc1": "image embedding, 1st principal component",
    "p_high": "predicted P(high)",
}


NUMERICAL_STATTEST = "ks"
CATEGORICAL_STATTEST = "chi2_homogeneity"
_MIN_EXPECTED = 5  # categories expected fewer times than this (in either sample) are pooled


# --- reading a batch -------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchCases:
    """A batch's rows (``image_id, lesion_id, age, sex, localization``) and their image files.

    ``lesion_id`` is empty where the source does not say which images show the same lesion.
    """

    frame: pd.DataFrame
    paths: list[Path]
    kind: str  # "ham10000" or "cases_csv"


def _checked_clinical(table: pd.DataFrame, source: Path, first_line: int = 2) -> pd.DataFrame:
    """Parsed age and checked sex/site, with errors naming the file and line."""
    ages = [
        parse_age(value, where=f"{source} line {line}") for line, value in enumerate(table["age"].tolist(), first_line)
    ]
    for column, accepted in (("sex", SEXES), ("localization", LOCALIZATIONS)):
        bad = ~table[column].isin(accepted)
        if bad.any():
            position = int(np.flatnonzero(bad.to_numpy())[0])
            raise DataError(
                f"{source} line {position + first_line}: {column} {table[column].iloc[position]!r} is not one of "
                f"{list(accepted)} ({int(bad.sum())} row(s) in all)"
            )
    return table.assign(age=ages)


def read_batch(batch: Path, scratch: Path, images_dir: Path | None = None) -> BatchCases:
    """The cases of ``batch``: a HAM10000 folder or zip (imported into ``scratch``) or a cases CSV.

    A cases CSV has the columns ``image`` (a file path relative to ``images_dir``, by default the
    CSV's folder), ``age``, ``sex`` and ``localization``; labels are not needed.
    """
    from tasks.metadata import read_metadata_table

    batch = Path(batch)
    if batch.is_file() and batch.suffix.lower() in (".csv", ".tsv"):
        table = read_metadata_table(batch)
        missing = [c for c in ("image", *CLINICAL_COLUMNS) if c not in table.columns]
        if missing:
            raise DataError(
                f"{batch}: missing column(s) {missing}; found {list(table.columns)}. A cases CSV has "
                "image (path relative to the images folder), age, sex, localization"
            )
        root = Path(images_dir) if images_dir is not None else batch.parent
        paths = [root / name for name in table["image"]]
        absent = [(line, str(p)) for line, p in enumerate(paths, 2) if not p.is_file()]
        if absent:
            raise DataError(
                f"{batch}: {len(absent)} image(s) not found under {root}, e.g. line {absent[0][0]}: {absent[0][1]}"
                + (" (pass the images folder)" if images_dir is None else "")
            )
        frame = _checked_clinical(table, batch).assign(
            image_id=[Path(name).stem for name in table["image"]],
            lesion_id=table["lesion_id"] if "lesion_id" in table.columns else "",
        )
        kind = "cases_csv"
    else:
        from tasks.ingest import import_dataset, read_raw_metadata
        from tasks.schema import RAW_METADATA_FILE, raw_image_path

        raw_dir = Path(scratch) / "raw"
        import_dataset(batch, raw_dir, progress=False)
        frame = _checked_clinical(read_raw_metadata(raw_dir), raw_dir / RAW_METADATA_FILE)
        paths = [raw_image_path(raw_dir, image_id) for image_id in frame["image_id"]]
        kind = "ham10000"
    return BatchCases(frame[["image_id", "lesion_id", *CLINICAL_COLUMNS]].reset_index(drop=True), paths, kind)


def profile_batch(
    reference: ReferenceProfile,
    bundle: Bundle,
    frame: pd.DataFrame,
    images: np.ndarray,
    sizes: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """A batch's monitored columns, projected onto the reference's embedding components."""
    outputs = model_outputs(bundle, images, bundle.encoder.transform(frame))
    if not any(c in reference.table.columns for c in SIZE_COLUMNS):
        sizes = None
    return profile_table(frame, image_statistics(images), outputs, reference.pca, sizes)


# --- drift -----------------------------------------------------------------------------------


def _chi2_homogeneity(reference: pd.Series, current: pd.Series, feature_type, threshold: float) -> tuple[float, bool]:
    """Two-sample chi-square test of homogeneity; rare categories are pooled so the test holds."""
    from scipy.stats import chi2_contingency

    ref_counts = reference.astype(str).value_counts()
    cur_counts = current.astype(str).value_counts()
    counts = pd.DataFrame({"reference": ref_counts, "current": cur_counts}).fillna(0.0)
    totals = counts.sum(axis=0)
    expected_smaller = counts.sum(axis=1) * totals.min() / totals.sum()
    rare = expected_smaller < _MIN_EXPECTED
    if rare.any() and (~rare).sum() >= 1:
        counts = pd.concat([counts.loc[~rare], counts.loc[rare].sum().to_frame("(rare)").T])
    if len(counts) < 2:
        return 1.0, False  # one category in both samples: nothing can have shifted
    p_value = float(chi2_contingency(counts.to_numpy().T, correction=False)[1])
    return p_value, p_value < threshold


def _register_stattests() -> None:
    from evidently.legacy.calculations.stattests.registry import StatTest, register_stattest
    from evidently.legacy.core import ColumnType

    register_stattest(
        StatTest(
            name=CATEGORICAL_STATTEST,
            display_name="chi-square two-sample p_value",
            allowed_feature_types=[ColumnType.Categorical],
            default_threshold=0.05,
        ),
        default_impl=_chi2_homogeneity,
    )


@dataclass(frozen=True)
class ColumnDrift:
    group: str
    stattest: str
    threshold: float
    score: float | None  # p-value; None where undefined
    drifted: bool


@dataclass
class DriftResult:
    """Per-column drift of a batch against the reference, and the alarm decision."""

    columns: dict[str, ColumnDrift]
    skipped: dict[str, str]  # column -> why it was not tested
    drift_share: float  # the alarm threshold
    # Evidently's dataset-level verdict (its DriftedColumnsCount test fails from ``drift_share``
    # on); None on the report-less benchmark path, where the same rule is applied to the columns.
    dataset_drift: bool | None = None
    snapshot: Any = field(default=None, repr=False)  # the Evidently snapshot, when a report was run

    @property
    def n_columns(self) -> int:
        return len(self.columns)

    @property
    def drifted_columns(self) -> list[str]:
        return [name for name, column in self.columns.items() if column.drifted]

    @property
    def n_drifted(self) -> int:
        return len(self.drifted_columns)

    @property
    def drifted_share(self) -> float:
        return self.n_drifted / self.n_columns if self.n_columns else 0.0

    @property
    def alarm(self) -> bool:
        if self.dataset_drift is not None:
            return self.dataset_drift
        return self.n_columns > 0 and self.drifted_share >= self.drift_share

    def group_summary(self) -> dict[str, dict]:
        summary = {}
        for group in GROUPS:
            names = [n for n, c in self.columns.items() if c.group == group]
            drifted = [n for n in names if self.columns[n].drifted]
            summary[group] = {
                "n_columns": len(names),
                "n_drifted": len(drifted),
                "drifted_share": len(drifted) / len(names) if names else 0.0,
                "drifted_columns": drifted,
            }
        return summary

    def reason(self) -> str:
        """Why the alarm is (or is not) raised, in one sentence naming the drifted columns."""
        rule = ">=" if self.alarm else "<"
        head = (
            f"{self.n_drifted} of {self.n_columns} monitored columns drifted "
            f"({self.drifted_share:.0%} {rule} alarm share {self.drift_share:.0%})"
        )
        details = [
            f"{group}: {', '.join(info['drifted_columns'])}"
            for group, info in self.group_summary().items()
            if info["drifted_columns"]
        ]
        return head + (": " + "; ".join(details) if details else "")


def _finite(values: pd.Series) -> pd.Series:
    return values.replace([np.inf, -np.inf], np.nan).dropna()


def _score(value: float | None) -> float | None:
    """A p-value as the summary keeps it: None where undefined."""
    return None if value is None or not math.isfinite(value) else float(value)


def _reading_order(drifted: bool, score: float | None) -> tuple[bool, float]:
    """Drifted columns first, then by p-value (undefined last): how the report and the summary list them."""
    return not drifted, math.inf if score is None else score


def _testable_columns(
    reference: pd.DataFrame, current: pd.DataFrame, groups: dict[str, list[str]]
) -> tuple[dict[str, str], dict[str, str]]:
    """column -> group for the columns with values on both sides; column -> why for the others."""
    tested, skipped = {}, {}
    for group, names in groups.items():
        for name in names:
            if name not in current.columns:
                skipped[name] = "not in the batch"
            elif _finite(reference[name]).empty:
                skipped[name] = "no values in the reference"
            elif _finite(current[name]).empty:
                skipped[name] = "no values in the batch"
            else:
                tested[name] = group
    return tested, skipped


@functools.cache
def _report_parts() -> tuple[type, type]:
    """Two Evidently report items (classes made on first use: importing Evidently takes seconds).

    ``ReportTitle`` puts a heading first; ``DriftedFirstPreset`` is Evidently's data-drift preset
    whose column table lists drifted columns first, then by p-value. The preset sorts by score,
    highest first, which suits distances but puts the least drifted columns first for the p-values
    both our tests give. Snapshots keep the rendered widgets, so the order holds in the UI too.
    """
    from evidently.core.container import MetricContainer
    from evidently.legacy.renderers.html_widgets import header_text
    from evidently.metrics import ValueDrift
    from evidently.presets import DataDriftPreset

    class ReportTitle(MetricContainer):
        text: str

        def generate_metrics(self, context) -> list:
            return []

        def render(self, context, child_widgets=None) -> list:
            return [header_text(label=self.text)]

    class DriftedFirstPreset(DataDriftPreset):
        def render(self, context, child_widgets=None) -> list:
            widgets = super().render(context, child_widgets)
            # The table shows scores rounded to 6 decimals: order by the exact p-values.
            p_values = {
                metric.column: _score(context.get_metric_result(metric).value)
                for metric in self.metrics(context)
                if isinstance(metric, ValueDrift)
            }

            def order(row: dict) -> tuple[bool, float]:
                return _reading_order(row["data_drift"] == "Detected", p_values.get(row["column_name"]))

            for widget in widgets:
                if widget.type == "big_table":
                    widget.params["data"].sort(key=order)
            return widgets

    return ReportTitle, DriftedFirstPreset


def detect_drift(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    groups: dict[str, list[str]],
    params: MonitorParams,
    *,
    title: str | None = None,
) -> DriftResult:
    """Run the Evidently data-drift report on the monitored columns and read its per-column verdicts.

    ``title`` heads the report (see :class:`RunLabel`); its column table lists drifted columns first.
    """
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import DriftedColumnsCount, ValueDrift

    ReportTitle, DriftedFirstPreset = _report_parts()
    _register_stattests()
    tested, skipped = _testable_columns(reference, current, groups)
    if not tested:
        raise DataError("no monitored column has values in both the reference and the batch")
    names = list(tested)
    numerical = [n for n in names if n not in CATEGORICAL_COLUMNS]
    categorical = [n for n in names if n in CATEGORICAL_COLUMNS]
    definition = DataDefinition(numerical_columns=numerical, categorical_columns=categorical)

    def dataset(table: pd.DataFrame):
        return Dataset.from_pandas(table[names].astype(dict.fromkeys(categorical, str)), data_definition=definition)

    preset = DriftedFirstPreset(
        columns=names,
        drift_share=params.drift_share,
        num_method=NUMERICAL_STATTEST,
        cat_method=CATEGORICAL_STATTEST,
        threshold=params.stattest_threshold,
    )
    report = Report([*([ReportTitle(text=title)] if title else []), preset], include_tests=True)
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        # Evidently correlates every pair of columns for its plots; constant ones warn, harmlessly.
        warnings.simplefilter("ignore", RuntimeWarning)
        snapshot = report.run(current_data=dataset(current), reference_data=dataset(reference))
    # The preset's results: each column's p-value and test, and the dataset's test ("share of
    # drifted columns less than drift_share"); a failed test is drift.
    columns, dataset_drift = {}, None
    for metric in preset.metrics(snapshot.context):
        result = snapshot.context.get_metric_result(metric)
        failed = any(test.status == "FAIL" for test in result.tests)
        if isinstance(metric, ValueDrift):
            group = tested[metric.column]
            columns[metric.column] = ColumnDrift(group, metric.method, metric.threshold, _score(result.value), failed)
        elif isinstance(metric, DriftedColumnsCount):
            dataset_drift = failed
    return DriftResult({name: columns[name] for name in names}, skipped, params.drift_share, dataset_drift, snapshot)


def column_drift(
    reference: pd.DataFrame, current: pd.DataFrame, groups: dict[str, list[str]], params: MonitorParams
) -> DriftResult:
    """The same per-column verdicts as :func:`detect_drift`, from the same Evidently stattests, without
    building a report, for benchmarks/monitor_sensitivity.py's batches (tests/model/test_monitor.py
    checks the two agree). Kept because the report would dominate that benchmark: 1.1-1.2 s per
    200-case batch against a 1,000-case reference with the report, 25 ms without (42-48x;
    benchmarks/drift_paths.py, 2 cores), i.e. about 2.5 min vs 3 s over its up to 130 batches."""
    from evidently.legacy.calculations.stattests.registry import get_stattest
    from evidently.legacy.core import ColumnType

    _register_stattests()
    tested, skipped = _testable_columns(reference, current, groups)
    columns = {}
    for name, group in tested.items():
        categorical = name in CATEGORICAL_COLUMNS
        kind = ColumnType.Categorical if categorical else ColumnType.Numerical
        method = CATEGORICAL_STATTEST if categorical else NUMERICAL_STATTEST
        ref, cur = _finite(reference[name]), _finite(current[name])
        if categorical:
            ref, cur = ref.astype(str), cur.astype(str)
        result = get_stattest(ref, cur, kind, method)(ref, cur, kind, params.stattest_threshold)
        columns[name] = ColumnDrift(
            group, method, params.stattest_threshold, _score(result.drift_score), bool(result.drifted)
        )
    return DriftResult(columns, skipped, params.drift_share)


# --- history: the Evidently workspace --------------------------------------------------------


@dataclass(frozen=True)
class RunLabel:
    """What names one monitoring run: the report's title and its snapshot's tags in the workspace."""

    batch: str  # the batch's file or folder name
    model_version: str  # see model_version
    created_at: datetime  # UTC

    @property
    def title(self) -> str:
        return f"Drift of batch {self.batch} · model {self.model_version} · {self.created_at:%Y-%m-%d %H:%M} UTC"

    def tags(self, alarm: bool) -> list[str]:
        return [
            f"batch:{self.batch}",
            f"model:{self.model_version}",
            f"date:{self.created_at:%Y-%m-%d}",
            "alarm" if alarm else "no-alarm",
        ]


def model_version(model: Bundle | Path | str, fingerprint: str) -> str:
    """The monitored model as a person names it: ``skinrisk v3`` where an MLflow URI names a
    registered version (or an alias of one), else the file name and the start of its weights'
    fingerprint (which always tells two models apart)."""
    weights = f"weights {fingerprint[:12]}"
    if isinstance(model, Bundle):
        return weights
    text = str(model)
    if not text.startswith("models:/"):
        return f"{text if is_model_uri(text) else Path(text).name}, {weights}"
    ref = text.removeprefix("models:/")
    name, _, version = ref.partition("/")
    if version.isdigit():
        return f"{name} v{version}"
    if "@" in ref:
        name, alias = ref.split("@", 1)
        try:
            from tasks.tracking import client

            return f"{name} v{client().get_model_version_by_alias(name, alias).version}"
        except Exception:  # a label only: monitoring must not fail for it (the alias may have moved)
            pass
    return f"{ref}, {weights}"


_DASHBOARD_IDS = uuid.uuid5(uuid.NAMESPACE_URL, "skinrisk/monitoring/dashboard")


def drift_dashboard(params: MonitorParams) -> tuple[Any, list[Any]]:
    """The project's dashboard tab and panels: drifted share and count, and the drift of
    :data:`DASHBOARD_COLUMNS`, per snapshot over time. Ids are fixed, so rewriting it is idempotent."""
    from evidently.sdk.models import DashboardTabModel, PanelMetric
    from evidently.sdk.panels import bar_plot_panel, line_plot_panel

    panels = [
        line_plot_panel(
            title="Share of drifted columns",
            values=[
                PanelMetric(legend="drifted share", metric="DriftedColumnsCount", metric_labels={"value_type": "share"})
            ],
            description=f"per batch; the alarm (and retraining) is raised from {params.drift_share:.0%}",
            size="half",
        ),
        bar_plot_panel(
            title="Drifted columns",
            values=[
                PanelMetric(
                    legend="drifted columns", metric="DriftedColumnsCount", metric_labels={"value_type": "count"}
                )
            ],
            description="number of monitored columns that drifted, per batch",
            size="half",
        ),
    ]
    for column, label in DASHBOARD_COLUMNS.items():
        test = CATEGORICAL_STATTEST if column in CATEGORICAL_COLUMNS else NUMERICAL_STATTEST
        panels.append(
            line_plot_panel(
                title=f"Drift of {label}",
                values=[PanelMetric(legend=f"{column} p-value", metric="ValueDrift", metric_labels={"column": column})],
                description=f"{test} p-value per batch: below {params.stattest_threshold} the column drifted",
                size="half",
            )
        )
    panels = [panel.copy(update={"id": uuid.uuid5(_DASHBOARD_IDS, panel.title)}) for panel in panels]
    tab = DashboardTabModel(
        id=uuid.uuid5(_DASHBOARD_IDS, DASHBOARD_TAB), title=DASHBOARD_TAB, panels=[p.id for p in panels]
    )
    return tab, panels


def _ensure_dashboard(workspace, project_id, params: MonitorParams) -> None:
    """Put our tab first on the project's dashboard; other tabs (a user's) are kept."""
    from evidently.sdk.models import DashboardModel

    tab, panels = drift_dashboard(params)
    current = workspace.get_dashboard(project_id)
    others = [t for t in current.tabs if t.id != tab.id]
    kept = {panel_id for t in others for panel_id in t.panels}
    wanted = DashboardModel(tabs=[tab, *others], panels=[*panels, *(p for p in current.panels if p.id in kept)])
    if wanted != current:
        workspace.save_dashboard(project_id, wanted)


def add_to_workspace(
    workspace: Path,
    snapshot,
    label: RunLabel,
    *,
    alarm: bool,
    metadata: dict[str, str],
    params: MonitorParams,
) -> dict[str, str]:
    """Add a run's report as a snapshot of the workspace's ``skinrisk`` project, tagged with
    :meth:`RunLabel.tags` and timestamped ``label.created_at``; the project and its dashboard are
    made on first use. Returns where it went. Browse with ``evidently ui --workspace WORKSPACE``."""
    from evidently.core.report import Snapshot
    from evidently.ui.workspace import Workspace

    workspace = Path(workspace)
    store = Workspace.create(str(workspace))
    found = store.search_project(EVIDENTLY_PROJECT)
    project = (
        found[0]
        if found
        else store.create_project(
            EVIDENTLY_PROJECT, description="Drift of monitored batches against the skinrisk training reference"
        )
    )
    _ensure_dashboard(store, project.id, params)
    # Tags and metadata carry the verdict, known only once the report has run.
    model = snapshot.to_snapshot_model().copy(
        update={
            "name": label.title,
            "timestamp": label.created_at.astimezone(UTC).replace(tzinfo=None),  # Evidently's are naive
            "tags": label.tags(alarm),
            "metadata": metadata,
        }
    )
    added = store.add_run(project.id, Snapshot.load_model(model), include_data=False)
    return {
        "workspace": str(workspace),
        "project": EVIDENTLY_PROJECT,
        "project_id": str(project.id),
        "snapshot_id": str(added.id),
    }


def titled_html(snapshot, title: str) -> str:
    """The report as a standalone page whose browser title is ``title`` (Evidently's page has none)."""
    page = snapshot.get_html_str(as_iframe=False)
    return page.replace("</head>", f"<title>{html.escape(title)}</title>\n</head>", 1)


# --- the stage -------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetrainingOutcome:
    """What became of a retraining request, for the summary, the MLflow tags and the console."""

    requested: bool
    triggered: bool
    deployment: str
    message: str
    flow_run_id: str | None = None


@dataclass(frozen=True)
class MonitorResult:
    summary_path: str
    report_html: str
    report_json: str
    n_images: int  # received
    n_tested: int  # with an age (when the model needs one), one per lesion
    n_columns: int
    n_drifted: int
    drifted_share: float
    drifted_columns: list[str]
    alarm: bool
    reason: str
    retraining: RetrainingOutcome
    run_id: str | None
    model_version: str = ""
    evidently: dict[str, str] | None = None  # where the snapshot went (add_to_workspace), if recorded


def start_monitoring_run(batch: Path | str, reference_path: Path | str, params: MonitorParams) -> str:
    """Open this batch's run in the MLflow experiment ``skinrisk-monitoring``; returns its id."""
    from tasks.tracking import start_run

    return start_run(
        f"monitor-{Path(batch).name}",
        {f"monitor.{k}": v for k, v in params.model_dump(mode="json").items()},
        {"batch": str(batch), "reference": str(reference_path)},
        experiment=MONITORING_EXPERIMENT,
    )


def _resolve_bundle(model: Bundle | Path | str, reference: ReferenceProfile) -> Bundle:
    if isinstance(model, Bundle):
        return model
    text = str(model)
    if "://" in text or text.startswith(("models:/", "runs:/")):
        return load_bundle(text, Path("."), Path("."))  # MLflow URIs carry their own encoder
    from tasks.model import load_model

    return reference.bundle(load_model(Path(model)))


def monitor_batch(
    reference_path: Path,
    model: Bundle | Path | str,
    batch: Path,
    out_dir: Path,
    params: MonitorParams,
    *,
    images_dir: Path | None = None,
    run_id: str | None = None,
    track: bool = True,
    retrain: Callable[[str, str], RetrainingOutcome] | None = None,
    workspace: Path | None = None,
) -> MonitorResult:
    """Compare ``batch`` with the reference profile; write the report and summary; log; maybe retrain.

    ``model`` is the model the profile was built with: a ``.keras`` path, an MLflow model URI
    (``models:/skinrisk@champion``) or a loaded :class:`~tasks.scored_model.Bundle`. With ``run_id`` the
    results are logged to that MLflow run (left open); otherwise, when ``track``, a new run is
    opened in ``skinrisk-monitoring`` and closed. On alarm, ``retrain(deployment, reason)`` is called
    with ``params.retrain_deployment`` (the orchestrators pass :func:`flows.retraining.trigger_retraining`);
    without it the alarm is recorded and nothing is triggered. With ``workspace`` (a local Evidently
    workspace folder) the report is also added there as a snapshot of the project ``skinrisk``, the
    history that ``out_dir``'s files (the latest batch) are not.
    """
    from tasks.images import decode_images
    from tasks.tracking import owned_run

    reference_path, batch, out_dir = Path(reference_path), Path(batch), Path(out_dir)
    created_at = datetime.now(UTC).replace(microsecond=0)
    if not batch.exists():  # before a monitoring run is opened for it
        raise DataError(f"batch {batch} not found: give a folder of images (with metadata) or a cases CSV")
    reference = ReferenceProfile.load(reference_path)
    owns_run = run_id is None and track
    if owns_run:
        run_id = start_monitoring_run(batch, reference_path, params)
    with owned_run(run_id if owns_run else None):
        bundle = _resolve_bundle(model, reference)
        fingerprint = model_fingerprint(bundle.model)
        if fingerprint != reference.meta.get("model_fingerprint"):
            raise SkinriskError(
                f"reference profile {reference_path} was built with another model (weights "
                f"{str(reference.meta.get('model_fingerprint'))[:12]}, this one {fingerprint[:12]}): its embedding "
                "components and predicted-risk distribution do not describe this model. Rebuild the profile for "
                "the model you monitor (build_reference_profile)"
            )
        if bundle.summary.image_size != reference.image_size:
            raise SkinriskError(
                f"the model takes {bundle.summary.image_size}px images, the reference profile "
                f"{reference.image_size}px: rebuild the profile"
            )
        with tempfile.TemporaryDirectory(prefix="skinrisk-monitor-") as scratch:
            cases = read_batch(batch, Path(scratch), images_dir)
            frame = cases.frame
            if bundle.encoder.missing_policy == "drop":  # as the model was trained: no case without an age
                frame = frame.loc[frame["age"].notna()]
            if frame.empty:
                raise DataError(f"{batch}: no case left to monitor ({len(cases.frame)} received, none with an age)")
            n_dropped = len(cases.frame) - len(frame)
            frame = frame.iloc[one_per_lesion(frame["lesion_id"], params.seed)]
            paths = [cases.paths[i] for i in frame.index]
            frame = frame.reset_index(drop=True)
            images = decode_images(paths, reference.image_size, workers=1 if len(paths) < 400 else 0)
            current = profile_batch(reference, bundle, frame, images, original_sizes(paths))
        label = RunLabel(batch.name, model_version(model, fingerprint), created_at)
        drift = detect_drift(reference.table, current, reference.groups, params, title=label.title)

        out_dir.mkdir(parents=True, exist_ok=True)
        write_text(out_dir / REPORT_HTML, titled_html(drift.snapshot, label.title))
        write_text(out_dir / REPORT_JSON, drift.snapshot.json())
        recorded = None
        if workspace is not None:
            recorded = add_to_workspace(
                Path(workspace),
                drift.snapshot,
                label,
                alarm=drift.alarm,
                metadata={
                    "batch": batch.name,
                    "batch_path": str(batch),
                    "model": "in-memory model" if isinstance(model, Bundle) else str(model),
                    "model_version": label.model_version,
                    "model_fingerprint": fingerprint,
                    "date": f"{created_at:%Y-%m-%d}",
                    "created_at": created_at.isoformat(),
                    "alarm": "yes" if drift.alarm else "no",
                    "drifted_share": f"{drift.drifted_share:.4g}",
                    "drifted_columns": ", ".join(drift.drifted_columns),
                    "mlflow_run_id": run_id or "",
                },
                params=params,
            )

        reason = drift.reason()
        if not drift.alarm:
            outcome = RetrainingOutcome(False, False, params.retrain_deployment, "no alarm: retraining not requested")
        elif retrain is None:
            outcome = RetrainingOutcome(
                False, False, params.retrain_deployment, "alarm raised, but retraining was disabled for this run"
            )
        else:
            outcome = retrain(params.retrain_deployment, reason)

        summary = json_safe(
            {
                "batch": str(batch),
                "batch_kind": cases.kind,
                "reference": str(reference_path),
                "model_fingerprint": fingerprint,
                "model_version": label.model_version,
                "title": label.title,
                "n_images": len(cases.frame),
                "n_dropped_without_age": n_dropped,
                "n_tested": len(frame),  # one image per lesion (see one_per_lesion)
                "n_reference": len(reference.table),
                "stattest_threshold": params.stattest_threshold,
                "columns": {name: asdict(column) for name, column in drift.columns.items()},
                "skipped_columns": drift.skipped,
                "groups": drift.group_summary(),
                "n_columns": drift.n_columns,
                "n_drifted": drift.n_drifted,
                "drifted_share": drift.drifted_share,
                "drifted_columns": drift.drifted_columns,
                "drift_share_threshold": params.drift_share,
                "alarm": drift.alarm,
                "reason": reason,
                "retraining": asdict(outcome),
                "mlflow_run_id": run_id,
                "evidently": recorded,
                "created_at": created_at.isoformat(timespec="seconds"),
            }
        )
        write_json(out_dir / SUMMARY_FILE, summary)
        if run_id:
            _log_to_mlflow(run_id, summary, out_dir)
    headline = ("n_images", "n_tested", "n_columns", "n_drifted", "drifted_share", "drifted_columns", "alarm")
    return MonitorResult(
        summary_path=str(out_dir / SUMMARY_FILE),
        report_html=str(out_dir / REPORT_HTML),
        report_json=str(out_dir / REPORT_JSON),
        **{key: summary[key] for key in headline},
        reason=reason,
        retraining=outcome,
        run_id=run_id,
        model_version=label.model_version,
        evidently=recorded,
    )


def _log_to_mlflow(run_id: str, summary: dict, out_dir: Path) -> None:
    from tasks.tracking import log_artifacts, log_metrics, set_tags

    metrics: dict[str, Any] = {
        "drifted_share": summary["drifted_share"],
        "n_drifted": summary["n_drifted"],
        "n_columns": summary["n_columns"],
        "n_images": summary["n_images"],
        "alarm": int(summary["alarm"]),
        "drifted_share_by_group": {g: info["drifted_share"] for g, info in summary["groups"].items()},
        "drift_score": {name: column["score"] for name, column in summary["columns"].items()},
    }
    log_metrics(run_id, metrics)  # undefined scores (None) are not logged
    retraining = summary["retraining"]
    set_tags(
        run_id,
        {
            "alarm": str(summary["alarm"]).lower(),
            "drift_reason": summary["reason"][:4000],
            "retraining": "triggered" if retraining["triggered"] else "not triggered",
            "retraining_message": retraining["message"][:4000],
            "retrain_deployment": retraining["deployment"],
            "model_fingerprint": summary["model_fingerprint"],
            "model_version": summary["model_version"],
            **({"evidently_snapshot_id": summary["evidently"]["snapshot_id"]} if summary["evidently"] else {}),
        },
    )
    log_artifacts(run_id, [out_dir / SUMMARY_FILE, out_dir / REPORT_JSON, out_dir / REPORT_HTML], artifact_path="drift")


def _drifted_first(columns: dict[str, dict]) -> list[tuple[str, dict]]:
    """Summary columns as the report lists them (see _reading_order)."""
    return sorted(columns.items(), key=lambda item: _reading_order(item[1]["drifted"], item[1]["score"]))


def format_drift_summary(summary: dict) -> str:
    """``drift_summary.json`` as Markdown: the verdict, then one row per column, drifted first
    (console and Prefect)."""
    verdict = "**ALARM**" if summary["alarm"] else "no alarm"
    model = f", model {summary['model_version']}" if summary.get("model_version") else ""
    lines = [
        f"### Drift of `{summary['batch']}` ({summary['n_images']} images{model}, {summary['created_at']}) "
        "against the training reference",
        "",
        f"{verdict}: {summary['reason']}.",
        "",
        f"Retraining: {summary['retraining']['message']}.",
        "",
        "| column | group | test | score | drifted |",
        "|---|---|---|---|---|",
    ]
    for name, column in _drifted_first(summary["columns"]):
        score = "n/a" if column["score"] is None else f"{column['score']:.3g}"
        lines.append(
            f"| {name} | {column['group']} | {column['stattest']} | {score} | {'yes' if column['drifted'] else ''} |"
        )
    for name, why in summary.get("skipped_columns", {}).items():
        lines.append(f"| {name} | | skipped: {why} | | |")
    return "\n".join(lines) + "\n"


def summary_rows(summary: dict) -> list[dict]:
    """One row per monitored column, drifted first, for a Prefect table artifact."""
    return [
        {"column": name, **{k: column[k] for k in ("group", "stattest", "score", "drifted")}}
        for name, column in _drifted_first(summary["columns"])
    ]


def read_summary(path: Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise SkinriskError(f"{path} not found: run the monitoring first")
    return json.loads(path.read_text(encoding="utf-8"))
