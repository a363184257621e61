"""One screening run: relax candidates (and the reference phases) with a potential at one fidelity, compute
E_hull against the DFT reference hull and the all-model hull, and write the report.

This is the science behind the ``screen`` flow and the ``mfhull screen`` command; both only call
:func:`screen`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
from pymatgen.core import Structure

from pipeline.entries import row_to_entry
from pipeline.frames import RecordError
from pipeline.hull import build_reference_hull, e_above_hull, prediction_entry
from pipeline.hull.phase_diagram import ReferenceHull
from pipeline.relax import sanity
from pipeline.relax.calculator import MFPotentialCalculator
from pipeline.relax.relaxer import RelaxSettings, relax_many
from pipeline.report.writer import write_report

log = logging.getLogger(__name__)


def file_id(path: str | Path) -> str:
    """'<file stem>-<first 10 hex of its sha256>': names a checkpoint (model_id) unambiguously."""
    path = Path(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:10]
    return f"{path.stem}-{digest}"


def table_fingerprint(table: pa.Table, columns: Iterable[str] = ("entry_id", "thermo_type", "uncorrected_energy")) -> str:
    """Short content hash of an entries table (the data snapshot id of a report)."""
    cols = [c for c in columns if c in table.column_names]
    rows = sorted(json.dumps(r, sort_keys=True, default=str) for r in table.select(cols).to_pylist())
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()[:12]


def _truth_e_hull(truth: pa.Table | None, hull: ReferenceHull, ids: set[str]) -> dict[str, float]:
    """DFT E_hull of the candidates whose DFT entry at the hull's fidelity is in ``truth``; an entry belongs to a
    candidate when its data['candidate_id'], its entry_id, or its entry_id less a '-<fidelity>' suffix is the id."""
    out: dict[str, float] = {}
    if truth is None:
        return out
    suffix = f"-{hull.fidelity}"
    for row in truth.to_pylist():
        if row["fidelity"] != hull.fidelity:
            continue
        entry = row_to_entry(row)
        eid = row["entry_id"]
        names = {(entry.data or {}).get("candidate_id"), eid, eid[: -len(suffix)] if eid.endswith(suffix) else None}
        matches = names & ids
        if not matches:
            continue
        try:
            out[matches.pop()] = hull.decomposition_and_e_above_hull(entry)[1]
        except RecordError as exc:
            log.warning("no DFT E_hull for %s: %s", eid, exc)
    return out


def _reference_elements(references: pa.Table, fidelity: str) -> set[str]:
    """Elements with an elemental reference phase at ``fidelity`` (a hull needs one for every element)."""
    rows = references.select(["chemsys", "fidelity"]).to_pylist()
    return {r["chemsys"] for r in rows if r["fidelity"] == fidelity and "-" not in (r["chemsys"] or "-")}


def _failed_row(row: Mapping[str, Any] | str, error: str, fidelity: str, thermo_type: str) -> dict[str, Any]:
    """A report row of a candidate that was not relaxed, with its reason."""
    out: dict[str, Any] = {"candidate_id": row} if isinstance(row, str) else {
        k: row[k] for k in ("candidate_id", "formula", "chemsys", "source", "origin")}
    out.update(fidelity=fidelity, thermo_type=thermo_type, relax_status="not_relaxed", error=error)
    return out


def _mark_suspect(out: dict[str, Any], findings: list[sanity.Finding]) -> None:
    """A suspect row keeps its predictions and says why in ``error`` ('suspect: ...'); its DFT E_hull moves to
    ``meta`` so that it stays out of the metrics."""
    if not findings:
        return
    out["error"] = f"suspect: {sanity.describe(findings)}"
    meta = json.loads(out.get("meta") or "{}")
    meta.update(suspect=True, e_hull_true_excluded=out.get("e_hull_true"))
    out["meta"], out["e_hull_true"] = json.dumps(meta), None


def failure_table(report: str | Path | pa.Table) -> str:
    """Plain-text table of the failed and suspect candidates of a report (candidate, outcome, reason), and a
    count line; 'all N candidates usable' when there are none."""
    import pyarrow.parquet as pq

    table = report if isinstance(report, pa.Table) else pq.read_table(report)
    rows = [r for r in table.select(["candidate_id", "relax_status", "error"]).to_pylist() if r["error"]]
    if not rows:
        return f"screen: all {table.num_rows} candidates usable (no failures)"
    width = min(40, max(len("candidate"), *(len(str(r["candidate_id"])) for r in rows)))
    lines = [f"screen: {len(rows)} of {table.num_rows} candidates failed or suspect:",
             f"{'candidate':<{width}}  {'outcome':<12}  reason"]
    for r in rows:
        outcome = "suspect" if r["error"].startswith("suspect:") else "failed"
        reason = r["error"].removeprefix("suspect: ")
        lines.append(f"{str(r['candidate_id'])[:width]:<{width}}  {outcome:<12}  {reason}")
    return "\n".join(lines)


def near_hull_references(hull: ReferenceHull, window: float) -> list[tuple[str, Structure]]:
    """(entry_id, structure) of the hull's entries within ``window`` eV/atom of it: the reference phases the
    potential re-computes for the all-model hull."""
    out = []
    for entry in hull.entries:
        structure = getattr(entry, "structure", None)
        if structure is not None and hull.diagram.get_e_above_hull(entry, allow_negative=True) <= window:
            out.append((str(entry.entry_id), structure))
    return out


def screen(
    candidates: pa.Table,
    references: pa.Table,
    *,
    checkpoint: str | Path,
    thermo_type: str,
    fidelity: str,
    out_dir: str | Path,
    model_fidelity: str | None = None,
    chemsys: str | None = None,
    truth: pa.Table | None = None,
    candidate_rejects: Iterable[Mapping[str, str]] = (),
    relax: RelaxSettings | None = None,
    reference_window: float = 0.1,
    device: str = "cpu",
) -> dict[str, Path]:
    """Screen ``candidates`` (CANDIDATES_SCHEMA) against ``references`` (ENTRIES_SCHEMA) and write the report.

    fidelity: fidelity of the DFT references (and of the report); model_fidelity: the potential's fidelity to use
    (default: the same name). Reference phases within ``reference_window`` eV/atom of the DFT hull are relaxed by
    the potential too, for the all-model hull. ``truth``: DFT entries of the candidates (optional) for metrics.
    ``candidate_rejects``: candidates that could not be read (record_id, error), kept as failed rows.
    """
    out_dir = Path(out_dir)
    relax = relax or RelaxSettings()
    failed_rows = [_failed_row(r["record_id"], f"unreadable candidate: {r['error']}", fidelity, thermo_type)
                   for r in candidate_rejects]
    cand_rows = []
    known = _reference_elements(references, fidelity)
    for row in candidates.to_pylist():
        foreign = sorted(set(row["chemsys"].split("-")) - known)
        if foreign:
            failed_rows.append(_failed_row(row, f"{row['origin']}: element(s) {', '.join(foreign)} have no "
                                                f"elemental reference phase at fidelity {fidelity} in the "
                                                "references", fidelity, thermo_type))
        else:
            cand_rows.append(row)
    if not cand_rows:  # nothing to relax: the report holds every candidate with its reason
        return write_report(failed_rows, out_dir, title=f"E_hull screening at {fidelity}: no usable candidate")
    systems = {r["chemsys"] for r in cand_rows}
    if chemsys is None:
        elements = sorted({el for s in systems for el in s.split("-")})
        chemsys = "-".join(elements)
    hull = build_reference_hull(references, thermo_type, chemsys=chemsys, fidelity=fidelity)
    model_id = file_id(checkpoint)
    snapshot = table_fingerprint(references)
    calc = MFPotentialCalculator.from_checkpoint(checkpoint, model_fidelity or fidelity, device=device)
    relax_dir = out_dir / "relaxations"

    ref_items = near_hull_references(hull, reference_window)
    log.info("relaxing %d reference phases and %d candidates with %s at %s", len(ref_items), len(cand_rows),
             model_id, model_fidelity or fidelity)
    mfid = model_fidelity or fidelity
    ref_relax = relax_many(ref_items, calc, relax, model_id=model_id, fidelity=fidelity, model_fidelity=mfid,
                           role="reference", out=relax_dir)
    model_energies = {r["candidate_id"]: r["energy"] for r in ref_relax.to_pylist() if r["energy"] is not None}
    volumes = sanity.reference_volume_range(getattr(e, "structure", None) for e in hull.entries)
    items, suspect, usable = [], {}, []
    for r in cand_rows:
        structure = Structure.from_dict(json.loads(r["structure"]))
        found = sanity.before_relaxation(structure, volumes)
        if sanity.worst(found) == sanity.FAILED:
            failed_rows.append(_failed_row(r, f"{r['origin']}: {sanity.describe(found)}", fidelity, thermo_type))
            continue
        suspect[r["candidate_id"]] = list(found)
        usable.append(r)
        items.append((r["candidate_id"], structure))
    cand_rows = usable
    cand_relax = {r["candidate_id"]: r for r in relax_many(
        items, calc, relax, model_id=model_id, fidelity=fidelity, model_fidelity=mfid, role="candidate",
        out=relax_dir).to_pylist()}

    predictions = []
    for cid, rel in cand_relax.items():
        if rel["energy"] is not None:
            relaxed = Structure.from_dict(json.loads(rel["structure"]))
            suspect[cid] += sanity.after_relaxation(relaxed, volumes)
            predictions.append(prediction_entry(cid, relaxed, energy=rel["energy"]))
    notes: list[str] = []
    try:
        hull_rows = e_above_hull(predictions, hull, model_energies=model_energies, fidelity=fidelity)
    except RecordError as exc:  # e.g. an elemental reference failed to relax: report the DFT-hull values only
        notes.append(f"no all-model hull: {exc}")
        log.warning("no all-model hull: %s", exc)
        hull_rows = e_above_hull(predictions, hull, fidelity=fidelity)
    by_id = {r["candidate_id"]: r for r in hull_rows}
    truth_e = _truth_e_hull(truth, hull, set(cand_relax))

    report: list[dict[str, Any]] = []
    for row in cand_rows:
        cid = row["candidate_id"]
        rel = cand_relax[cid]
        out: dict[str, Any] = dict(by_id.get(cid, {}))
        out.update({
            "candidate_id": cid, "formula": row["formula"], "chemsys": row["chemsys"], "source": row["source"],
            "origin": row["origin"], "fidelity": fidelity, "thermo_type": hull.thermo_type,
            "relax_status": rel["status"], "relax_steps": rel["n_steps"], "e_hull_true": truth_e.get(cid),
            "meta": json.dumps({"relax_wall_s": rel["wall_s"], "fmax": rel["fmax"], "notes": notes}),
        })
        if rel["status"] == "failed":
            out["error"] = f"relaxation failed: {rel['error']}"
        else:
            _mark_suspect(out, suspect[cid] + sanity.energy_findings(out.get("e_hull_pred_dft_hull")))
        report.append(out)
    report.extend(failed_rows)
    return write_report(report, out_dir, model_id=model_id, data_snapshot_id=snapshot, reference_diagram=hull,
                        title=f"E_hull screening of {chemsys} at {fidelity} ({model_id})")
