"""The screening report: per-candidate Parquet, metrics summary (Parquet + JSON), Markdown summary, plots and
the relaxed structures (extxyz + CIF).

``write_report(rows_or_table, out_dir, ...)`` is the one entry point; every file is written atomically. The
run's provenance (:mod:`pipeline.report.provenance`) goes into report.parquet's schema metadata (key
``provenance``), summary.json and summary.md; every report and summary row carries the ``run_id``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline.hull.ehull import HULL_DFT, HULL_MODEL
from pipeline.io import write_json_atomic, write_table_atomic, write_text_atomic
from pipeline.report.metrics import stable_metrics
from pipeline.report.plots import HULL_LABELS, e_hull_strip_plot, parity_plot, phase_diagram_plot
from pipeline.report.schema import HULL_COLUMNS, RELAX_STATUSES, REPORT_SCHEMA, SUMMARY_SCHEMA
from pipeline.report.structures import write_structures

log = logging.getLogger(__name__)

HULL_DEFINITIONS = {
    HULL_DFT: "predicted energy vs the DFT reference hull of the same fidelity (column e_hull_pred_dft_hull)",
    HULL_MODEL: "predicted energy vs the all-model hull: reference phases re-computed by the model, one energy "
                  "scale (column e_hull_pred_model_hull)",
}


class ReportError(ValueError):
    """Report rows that cannot be written (missing id, unknown relaxation status...)."""


def _clean(value: Any) -> Any:
    return None if isinstance(value, float) and math.isnan(value) else value


def report_table(
    rows_or_table: pa.Table | Iterable[Mapping[str, Any]],
    *,
    model_id: str | None = None,
    data_snapshot_id: str | None = None,
    run_id: str | None = None,
) -> pa.Table:
    """REPORT_SCHEMA table from rows (dicts) or a table. Keys outside the schema go into ``meta`` (JSON);
    ``model_id`` / ``data_snapshot_id`` / ``run_id`` fill rows that have none."""
    rows = rows_or_table.to_pylist() if isinstance(rows_or_table, pa.Table) else [dict(r) for r in rows_or_table]
    names = set(REPORT_SCHEMA.names)
    out = []
    for i, row in enumerate(rows):
        cid = row.get("candidate_id")
        if not cid:
            raise ReportError(f"report row {i} has no candidate_id")
        status = row.get("relax_status")
        if status is not None and status not in RELAX_STATUSES:
            raise ReportError(f"{cid}: relax_status {status!r} is not one of {RELAX_STATUSES}")
        clean = {k: _clean(row.get(k)) for k in REPORT_SCHEMA.names}
        extra = {k: v for k, v in row.items() if k not in names and v is not None}
        if extra:
            meta = json.loads(clean["meta"]) if clean.get("meta") else {}
            meta.update(extra)
            clean["meta"] = json.dumps(meta, sort_keys=True, default=str)
        clean["model_id"] = clean["model_id"] or model_id
        clean["data_snapshot_id"] = clean["data_snapshot_id"] or data_snapshot_id
        clean["run_id"] = clean["run_id"] or run_id
        out.append(clean)
    return pa.Table.from_pylist(out, schema=REPORT_SCHEMA)


def _one(table: pa.Table, column: str) -> str | None:
    values = sorted({str(v) for v in table.column(column).to_pylist() if v is not None})
    return ",".join(values) if values else None


def summary_rows(table: pa.Table, thresholds: Sequence[float] = (0.0,)) -> list[dict[str, Any]]:
    """SUMMARY_SCHEMA rows: metrics of each hull's prediction at each threshold (candidates with a DFT E_hull),
    each row labelled with the run, model, fidelity and thermo type so that summaries of many runs concatenate."""
    e_true = table.column("e_hull_true").to_pylist()
    out: list[dict[str, Any]] = []
    if all(t is None for t in e_true):
        return out  # no DFT answer known: nothing to score
    labels = {k: _one(table, k) for k in ("run_id", "model_id", "fidelity", "thermo_type")}
    for hull, col in HULL_COLUMNS.items():
        pred = table.column(col).to_pylist()
        if all(p is None for p in pred):
            continue  # this hull was not computed (e.g. no model energies for the reference phases)
        for t in thresholds:
            m = stable_metrics(e_true, pred, t)
            out.append({**labels, "hull": hull, **{k: m[k] for k in SUMMARY_SCHEMA.names if k in m}})
    return out


def _fmt(x: Any, nd: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.{nd}f}" if isinstance(x, float) else str(x)


def markdown_summary(
    table: pa.Table, summary: Sequence[Mapping[str, Any]], files: Mapping[str, Path], title: str,
    notes: Sequence[str] = (), top: int = 20, provenance: Mapping[str, Any] | None = None,
) -> str:
    """Human-readable summary: provenance, counts, metrics per hull, best candidates, failures, plots."""
    rows = table.to_pylist()
    failed = [r for r in rows if r["error"]]
    lines = [f"# {title}", ""]
    prov = dict(provenance or {})
    for key in ("run_id", "created_utc", "code_version", "prefect_flow_run_id"):
        if key in prov:
            lines.append(f"- {key}: {prov[key] if prov[key] is not None else 'n/a'}")
    if prov.get("packages"):
        lines.append("- packages: " + ", ".join(f"{k} {v}" for k, v in prov["packages"].items() if v))
    if prov.get("relax"):
        lines.append("- relaxation: " + ", ".join(f"{k}={v}" for k, v in prov["relax"].items()))
    if "model_hull_phases" in prov:
        phases = prov["model_hull_phases"] or []
        lines.append(f"- all-model hull: {len(phases)} reference phases recomputed by the model "
                     f"(window {prov.get('reference_window')} eV/atom): {', '.join(phases[:30])}"
                     + (f" ... (+{len(phases) - 30}, see summary.json)" if len(phases) > 30 else ""))
    for key in ("fidelity", "thermo_type", "model_id", "data_snapshot_id"):
        values = sorted({str(r[key]) for r in rows if r[key] is not None})
        lines.append(f"- {key}: {', '.join(values) if values else 'n/a'}")
    status = Counter(r["relax_status"] or "unknown" for r in rows)
    lines += [f"- candidates: {len(rows)} ({len(failed)} failed)",
              f"- relaxation: {', '.join(f'{k} {v}' for k, v in sorted(status.items()))}", "",
              "Two E_hull values per candidate (eV/atom, negative = below the hull):", ""]
    lines += [f"- **{k}**: {v}" for k, v in HULL_DEFINITIONS.items()]
    lines += ["", "## Metrics (candidates with a known DFT E_hull)", ""]
    if summary:
        cols = ("F1", "DAF", "Precision", "Recall", "Accuracy", "TPR", "FPR", "TNR", "FNR", "MAE", "RMSE", "R2")
        lines += ["| hull | threshold | n | " + " | ".join(cols) + " |", "|---" * (3 + len(cols)) + "|"]
        for m in summary:
            lines.append(f"| {m['hull']} | {_fmt(m['stability_threshold'])} | {m['n']} | "
                         + " | ".join(_fmt(m[c], 2 if c == "DAF" else 3) for c in cols) + " |")
    else:
        lines.append("No candidate has a DFT E_hull: no metrics.")
    col = "e_hull_pred_model_hull" if any(r["e_hull_pred_model_hull"] is not None for r in rows) \
        else "e_hull_pred_dft_hull"
    ranked = sorted((r for r in rows if r[col] is not None), key=lambda r: r[col])[:top]
    lines += ["", f"## Lowest predicted E_hull (sorted by {col})", "",
              "| candidate | formula | E_hull vs DFT hull | E_hull vs model hull | DFT E_hull | relax |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {r['candidate_id']} | {r['formula']} | {_fmt(r['e_hull_pred_dft_hull'])} | "
              f"{_fmt(r['e_hull_pred_model_hull'])} | {_fmt(r['e_hull_true'])} | {r['relax_status'] or 'n/a'} |"
              for r in ranked]
    if failed:
        lines += ["", f"## Failed candidates ({len(failed)})", ""]
        lines += [f"- {r['candidate_id']}: {r['error']}" for r in failed[:50]]
        if len(failed) > 50:
            lines.append(f"- ... and {len(failed) - 50} more (see report.parquet)")
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    lines += ["", "## Files", ""] + [f"- {k}: `{p.name}`" for k, p in files.items()]
    plots = [(k, p) for k, p in files.items() if p.suffix == ".png"]
    lines += [""] + [f"![{k}]({p.name})" for k, p in plots]
    return "\n".join(lines) + "\n"


def _with_provenance(table: pa.Table, provenance: Mapping[str, Any]) -> pa.Table:
    meta = dict(table.schema.metadata or {})
    meta[b"provenance"] = json.dumps(provenance, sort_keys=True, default=str).encode()
    return table.replace_schema_metadata(meta)


def write_report(
    rows_or_table: pa.Table | Iterable[Mapping[str, Any]],
    out_dir: str | os.PathLike[str],
    *,
    model_id: str | None = None,
    data_snapshot_id: str | None = None,
    threshold: float = 0.0,
    reference_diagram: Any = None,
    title: str = "E_hull screening report",
    provenance: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """Write report.parquet, summary.parquet, summary.json, summary.md, parity.png, the phase diagram (2-4
    elements: phase_diagram.png) or E_hull strip plot (more: e_hull_strip.png), and the relaxed structures
    (structures/relaxed.extxyz, structures/<candidate>.cif) into ``out_dir``; return {name: path}.

    Metrics are computed at 0 eV/atom and at ``threshold`` (if different). ``reference_diagram`` is a pymatgen
    PhaseDiagram or a :class:`pipeline.hull.ReferenceHull` (its diagram is used). ``provenance``: see
    :func:`pipeline.report.provenance.provenance` (a fresh one, with a new run id, when not given).
    """
    from pipeline.report.provenance import provenance as new_provenance

    out = Path(out_dir)
    prov = dict(provenance) if provenance is not None else new_provenance()
    table = report_table(rows_or_table, model_id=model_id, data_snapshot_id=data_snapshot_id,
                         run_id=prov.get("run_id"))
    thresholds = sorted({0.0, float(threshold)})
    summary = summary_rows(table, thresholds)
    files: dict[str, Path] = {"report": write_table_atomic(_with_provenance(table, prov), out / "report.parquet")}
    files["summary_parquet"] = write_table_atomic(pa.Table.from_pylist(summary, schema=SUMMARY_SCHEMA),
                                                  out / "summary.parquet")
    rows = table.to_pylist()
    notes: list[str] = list(prov.get("notes") or [])
    labels = _plot_labels(rows)
    files["parity_plot"] = parity_plot(rows, out / "parity.png", threshold=float(threshold), subtitle=labels)
    if reference_diagram is not None:
        diagram = getattr(reference_diagram, "diagram", reference_diagram)
        n_el = len(diagram.elements)
        plot_title = f"{'-'.join(el.symbol for el in diagram.elements)}: {labels}"
        try:
            if n_el <= 4:
                files["phase_diagram_plot"] = phase_diagram_plot(diagram, rows, out / "phase_diagram.png",
                                                                 title=plot_title)
            else:
                files["e_hull_strip_plot"] = e_hull_strip_plot(rows, out / "e_hull_strip.png", title=plot_title)
        except ValueError as exc:
            notes.append(f"no phase diagram plot: {exc}")
            log.warning("report: no phase diagram plot: %s", exc)
    files.update(write_structures(rows, out / "structures"))
    files["summary_json"] = out / "summary.json"
    files["summary_md"] = out / "summary.md"
    write_json_atomic(files["summary_json"], {
        "title": title,
        "provenance": {k: v for k, v in prov.items() if k != "notes"},
        "n_candidates": table.num_rows,
        "n_failed": sum(1 for r in rows if r["error"]),
        "relax_status": dict(Counter(r["relax_status"] or "unknown" for r in rows)),
        "fidelity": sorted({r["fidelity"] for r in rows if r["fidelity"]}),
        "thermo_type": sorted({r["thermo_type"] for r in rows if r["thermo_type"]}),
        "model_id": sorted({r["model_id"] for r in rows if r["model_id"]}),
        "data_snapshot_id": sorted({r["data_snapshot_id"] for r in rows if r["data_snapshot_id"]}),
        "hulls": {k: f"{v} ({HULL_LABELS[k]})" for k, v in HULL_DEFINITIONS.items()},
        "metrics": [{k: _clean(v) for k, v in m.items()} for m in summary],
        "notes": notes,
        "files": {k: p.name for k, p in files.items()},
    }, default=str)
    write_text_atomic(files["summary_md"], markdown_summary(table, summary, files, title, notes, provenance=prov))
    return files


def _plot_labels(rows: Sequence[Mapping[str, Any]]) -> str:
    """'fidelity <f>, model <m>' for plot titles (joined when rows differ)."""
    fid = ", ".join(sorted({r["fidelity"] for r in rows if r.get("fidelity")})) or "n/a"
    model = ", ".join(sorted({r["model_id"] for r in rows if r.get("model_id")})) or "n/a"
    thermo = ", ".join(sorted({r["thermo_type"] for r in rows if r.get("thermo_type")}))
    return f"{thermo + ', ' if thermo else ''}fidelity {fid}, model {model}"
