"""Screening reports: per-candidate Parquet (REPORT_SCHEMA), E_hull metrics, Markdown summary and plots."""

from pipeline.report.metrics import classify_stable, regression_metrics, stable_metrics
from pipeline.report.plots import e_hull_strip_plot, parity_plot, phase_diagram_plot
from pipeline.report.schema import RELAX_STATUSES, REPORT_SCHEMA, SUMMARY_SCHEMA
from pipeline.report.writer import ReportError, markdown_summary, report_table, summary_rows, write_report

__all__ = [
    "RELAX_STATUSES",
    "REPORT_SCHEMA",
    "SUMMARY_SCHEMA",
    "ReportError",
    "classify_stable",
    "e_hull_strip_plot",
    "markdown_summary",
    "parity_plot",
    "phase_diagram_plot",
    "regression_metrics",
    "report_table",
    "stable_metrics",
    "summary_rows",
    "write_report",
]
