"""One screening run: relax candidates (and the reference phases) with a potential, compute E_hull against the
DFT reference hull and the all-model hull, and write the report.

Thermo type GGA_GGA+U_R2SCAN with a multi-fidelity model that has both a ``pbe`` and an ``r2scan`` head (and no
``model_fidelity`` forcing one head): every candidate is relaxed at both heads, and its two energies enter
pymatgen's mixing scheme with the reference entries (:func:`pipeline.hull.mixed_e_above_hull`); the all-model
hull has the GGA reference phases at the PBE head and the r2SCAN ones at the r2SCAN head.

This is the science behind the ``screen`` flow and the ``mfhull screen`` command; both only call
:func:`screen`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
from pymatgen.core import Structure

from pipeline.entries import normalize_run_type, row_to_entry
from pipeline.frames import RecordError
from pipeline.hull import (
    GGA_GGA_U_R2SCAN,
    build_reference_hull,
    e_above_hull,
    mixed_e_above_hull,
    prediction_entry,
)
from pipeline.hull.phase_diagram import ReferenceHull
from pipeline.hull.thermo import correct_like_reference, place_on_mixed_scale, uncorrected
from pipeline.model.checkpoint import load_checkpoint
from pipeline.relax import sanity
from pipeline.relax.calculator import MFPotentialCalculator
from pipeline.relax.relaxer import RelaxSettings, relax_many
from pipeline.report.provenance import material_id, provenance
from pipeline.report.writer import write_report

log = logging.getLogger(__name__)

#: Without an explicit window, every reference phase is recomputed by the model when there are at most this many.
ALL_REFERENCES_UP_TO = 50
#: Window (eV/atom above the DFT hull) used for larger reference sets when none is given.
DEFAULT_WINDOW = 0.1
MF_HEADS = ("pbe", "r2scan")


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


def _truth_fidelities(hull: ReferenceHull) -> set[str]:
    return set(MF_HEADS) if hull.thermo_type == GGA_GGA_U_R2SCAN else {hull.fidelity}


def _truth_e_hull(truth: pa.Table | None, hull: ReferenceHull, ids: set[str]) -> dict[str, float]:
    """DFT E_hull of the candidates whose DFT entry of the hull's thermo type (and fidelity) is in ``truth``; an
    entry belongs to a candidate when its data['candidate_id'], its entry_id, or its entry_id less a
    '-<fidelity>' suffix is the id. The entry's stored energy adjustments are those of its thermo type (one entry
    sits in an MP entries table once per thermo type), so rows of other thermo types are never used; if a
    candidate still has several rows, the lowest E_hull is kept and a warning names them.
    GGA_GGA+U_R2SCAN: stored mixing corrections depend on the chemical system they were mixed in (an r2SCAN Li
    entry mixed in Li-O sits on the GGA scale, the Li hull is on the r2SCAN scale), so the raw PBE and r2SCAN
    energies of the candidate are placed on this hull exactly as the predictions are."""
    out: dict[str, float] = {}
    if truth is None:
        return out
    fidelities = _truth_fidelities(hull)
    mixed = hull.thermo_type == GGA_GGA_U_R2SCAN
    found: dict[str, list[tuple[float, str]]] = {}
    raw: dict[str, dict[str, Any]] = {}
    for row in truth.to_pylist():
        if row["fidelity"] not in fidelities or (
                not mixed and row.get("thermo_type", hull.thermo_type) != hull.thermo_type):
            continue
        entry = row_to_entry(row)
        eid = row["entry_id"]
        suffix = f"-{row['fidelity']}"
        names = {(entry.data or {}).get("candidate_id"), eid, eid[: -len(suffix)] if eid.endswith(suffix) else None}
        matches = names & ids
        if not matches:
            continue
        cid = matches.pop()
        if mixed:
            raw.setdefault(cid, {}).setdefault(row["fidelity"], entry)
            continue
        try:
            found.setdefault(cid, []).append((hull.decomposition_and_e_above_hull(entry)[1], eid))
        except RecordError as exc:
            log.warning("no DFT E_hull for %s: %s", eid, exc)
    for cid, by_fid in raw.items():  # mixed: place the raw DFT energies like the predictions
        try:
            placed = place_on_mixed_scale(
                hull.mixing, pbe=None if "pbe" not in by_fid else correct_like_reference(by_fid["pbe"], hull.thermo_type),
                r2scan=None if "r2scan" not in by_fid else uncorrected(by_fid["r2scan"]))
            found[cid] = [(hull.decomposition_and_e_above_hull(placed)[1], cid)]
        except (RecordError, ValueError) as exc:
            log.warning("no DFT E_hull for %s: %s", cid, exc)
    for cid, values in found.items():
        if len({round(v, 6) for v, _ in values}) > 1:
            log.warning("%s: %d DFT entries of thermo type %s (%s); keeping the lowest E_hull", cid, len(values),
                        hull.thermo_type, ", ".join(e for _, e in values))
        out[cid] = min(v for v, _ in values)
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


def _head_of(entry: Any, hull: ReferenceHull, heads: tuple[str, ...]) -> str:
    if len(heads) == 1:
        return heads[0]
    return "r2scan" if normalize_run_type((entry.parameters or {}).get("run_type")) == "R2SCAN" else "pbe"


def model_hull_phases(
    hull: ReferenceHull, window: float | None = None, heads: tuple[str, ...] = ("pbe",),
) -> tuple[list[tuple[str, Structure, str]], float]:
    """Reference phases to recompute with the model for the all-model hull: (entry_id, structure, head) and the
    window used (eV/atom above the DFT hull of the phase's own run type).

    ``window=None``: every phase when there are at most :data:`ALL_REFERENCES_UP_TO`, else
    :data:`DEFAULT_WINDOW`. A narrow window misses phases the model would make stable, and the candidates then
    look more stable than they are. GGA_GGA+U_R2SCAN: a material is taken with both its GGA and its r2SCAN entry
    when either is inside the window (the pairs of pymatgen's mixing state), so the mixing scheme sees the same
    pairs on model energies.
    """
    mixing = hull.mixing if hull.thermo_type == GGA_GGA_U_R2SCAN else None
    pool = [e for e in (mixing.inputs if mixing else hull.entries) if getattr(e, "structure", None) is not None]
    if window is None:
        window = math.inf if len(pool) <= ALL_REFERENCES_UP_TO else DEFAULT_WINDOW
    if window < 0 or math.isnan(window):
        raise ValueError(f"reference window must be >= 0 eV/atom, got {window}")
    if mixing is None:
        keep = {str(e.entry_id) for e in pool if hull.diagram.get_e_above_hull(e, allow_negative=True) <= window}
    else:
        e_hull = {}
        for diagram in (mixing.gga, mixing.r2scan):
            if diagram is not None:
                e_hull.update({str(e.entry_id): diagram.get_e_above_hull(e, allow_negative=True)
                               for e in diagram.all_entries})
        keep = {i for i, v in e_hull.items() if v <= window}
        for pair in mixing.pairs():
            if keep & set(pair):
                keep |= {i for i in pair if i}
    chosen = [(str(e.entry_id), e.structure, _head_of(e, hull, heads)) for e in pool if str(e.entry_id) in keep]
    return chosen, float(window)


def _status(rels: list[dict[str, Any]]) -> str:
    statuses = {r["status"] for r in rels}
    if statuses == {"converged"}:
        return "converged"
    return "failed" if statuses == {"failed"} else "not_converged"


def relax_settings(rels: list[dict[str, Any]]) -> str | None:
    """The report's ``relax_settings``: JSON of the settings in the relaxations' keys (their ``settings`` less the
    batch budget, which changes no result); the heads of one candidate share them (same settings, same engine),
    otherwise they are given per relaxation key."""
    found = {}
    for r in rels:
        if r.get("settings"):
            settings = json.loads(r["settings"])
            settings.pop("batch", None)
            found[r["relax_key"]] = settings
    if not found:
        return None
    distinct = {json.dumps(v, sort_keys=True) for v in found.values()}
    return distinct.pop() if len(distinct) == 1 else json.dumps(found, sort_keys=True)


def candidates_chemsys(rows: Iterable[Mapping[str, Any]]) -> str:
    """The chemical system spanned by candidate rows ('Al-Li'): the system of the reference hull they are
    screened against."""
    return "-".join(sorted({el for r in rows for el in r["chemsys"].split("-")}))


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
    reference_window: float | None = None,
    device: str = "cpu",
    run_id: str | None = None,
) -> dict[str, Path]:
    """Screen ``candidates`` (CANDIDATES_SCHEMA) against ``references`` (ENTRIES_SCHEMA) and write the report.

    fidelity: fidelity of the DFT references (and of the report); model_fidelity: the potential's fidelity to use
    (default: the same name; for GGA_GGA+U_R2SCAN with a model that has ``pbe`` and ``r2scan`` heads: both).
    Reference phases chosen by :func:`model_hull_phases` (``reference_window`` eV/atom; default: all of them
    when there are at most 50, else 0.1) are relaxed by the potential too, for the all-model hull; the report's
    provenance lists them. ``truth``: DFT entries of the candidates (optional) for metrics.
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
    if chemsys is None:
        chemsys = candidates_chemsys(cand_rows)
    hull = build_reference_hull(references, thermo_type, chemsys=chemsys, fidelity=fidelity)
    model_id = file_id(checkpoint)
    snapshot = table_fingerprint(references)
    model = load_checkpoint(checkpoint, device=device)
    mixed = hull.thermo_type == GGA_GGA_U_R2SCAN
    if mixed and model_fidelity is None and set(MF_HEADS) <= set(model.fidelities):
        heads: tuple[str, ...] = MF_HEADS
    else:
        heads = (model_fidelity or fidelity,)
    calcs = {h: MFPotentialCalculator(model, h) for h in heads}  # an unknown head fails here, naming the known
    relax_dir = out_dir / "relaxations"

    ref_items, window = model_hull_phases(hull, reference_window, heads)
    log.info("relaxing %d reference phases (window %s eV/atom) and %d candidates with %s at %s", len(ref_items),
             window, len(cand_rows), model_id, "+".join(heads))
    model_energies: dict[str, float] = {}
    for head in heads:
        items = [(i, s) for i, s, h in ref_items if h == head]
        for r in relax_many(items, calcs[head], relax, model_id=model_id, fidelity=fidelity, model_fidelity=head,
                            role="reference", out=relax_dir).to_pylist():
            if r["energy"] is not None:
                model_energies[r["candidate_id"]] = r["energy"]
    volumes = sanity.reference_volume_range(getattr(e, "structure", None) for e in hull.entries)
    structures, suspect, usable = [], {}, []
    for r in cand_rows:  # physical sanity before relaxation: failed rows are not relaxed, suspect ones are
        structure = Structure.from_dict(json.loads(r["structure"]))
        found = sanity.before_relaxation(structure, volumes)
        if sanity.worst(found) == sanity.FAILED:
            failed_rows.append(_failed_row(r, f"{r['origin']}: {sanity.describe(found)}", fidelity, thermo_type))
            continue
        suspect[r["candidate_id"]] = list(found)
        usable.append(r)
        structures.append((r["candidate_id"], structure))
    cand_rows = usable
    cand_relax: dict[str, dict[str, dict[str, Any]]] = {h: {r["candidate_id"]: r for r in relax_many(
        structures, calcs[h], relax, model_id=model_id, fidelity=fidelity, model_fidelity=h, role="candidate",
        out=relax_dir).to_pylist()} for h in heads}

    predictions: dict[str, list[Any]] = {h: [] for h in heads}
    for h in heads:
        for cid, rel in cand_relax[h].items():
            if rel["energy"] is not None:
                relaxed = Structure.from_dict(json.loads(rel["structure"]))
                if h == heads[0]:
                    suspect[cid] += sanity.after_relaxation(relaxed, volumes)
                predictions[h].append(prediction_entry(cid, relaxed, energy=rel["energy"]))

    def hull_rows(energies: Mapping[str, float] | None) -> list[dict[str, Any]]:
        if len(heads) == 2:
            return mixed_e_above_hull(predictions["pbe"], predictions["r2scan"], hull, model_energies=energies)
        # a mixed hull places a prediction by its head (pbe / r2scan); any other hull compares the model, at the
        # head the user mapped with model_fidelity, against references of the report's fidelity
        placed_as = heads[0] if mixed else fidelity
        return e_above_hull(predictions[heads[0]], hull, model_energies=energies, fidelity=placed_as)

    notes: list[str] = []
    try:
        hull_rows_ = hull_rows(model_energies)
    except RecordError as exc:  # e.g. an elemental reference failed to relax: report the DFT-hull values only
        notes.append(f"no all-model hull: {exc}")
        log.warning("no all-model hull: %s", exc)
        hull_rows_ = hull_rows(None)
    by_id = {r["candidate_id"]: r for r in hull_rows_}
    truth_e = _truth_e_hull(truth, hull, {r["candidate_id"] for r in cand_rows})
    prov = provenance(
        run_id, model_id=model_id, checkpoint=str(checkpoint), thermo_type=hull.thermo_type, fidelity=fidelity,
        model_heads=list(heads), hull_scale=hull.scale, chemsys=hull.chemsys, data_snapshot_id=snapshot,
        relax=dataclasses.asdict(relax), reference_window=window,
        model_hull_phases=sorted(model_energies), model_hull_phases_failed=sorted(
            {i for i, _, _ in ref_items} - set(model_energies)), notes=notes,
    )

    report: list[dict[str, Any]] = []
    for row in cand_rows:
        cid = row["candidate_id"]
        rels = [cand_relax[h][cid] for h in heads]
        meta_in = json.loads(row["meta"]) if row.get("meta") else {}
        out: dict[str, Any] = dict(by_id.get(cid, {}))
        out.update({
            "candidate_id": cid, "material_id": material_id(cid, row["origin"], meta=meta_in),
            "formula": row["formula"], "chemsys": row["chemsys"], "source": row["source"],
            "origin": row["origin"], "fidelity": out.get("fidelity") or "+".join(heads),
            "thermo_type": hull.thermo_type, "relax_status": _status(rels), "relax_steps": rels[0]["n_steps"],
            "relax_key": "+".join(r["relax_key"] for r in rels), "relax_settings": relax_settings(rels),
            "e_hull_true": truth_e.get(cid), "structure": rels[0]["structure"],
            "meta": json.dumps({"relax": {h: {"status": r["status"], "steps": r["n_steps"], "wall_s": r["wall_s"],
                                              "fmax": r["fmax"], "relax_key": r["relax_key"],
                                              "batch": json.loads(r["settings"] or "{}").get("batch")}
                                          for h, r in zip(heads, rels, strict=True)},
                                **({"structure_r2scan": rels[1]["structure"]} if len(heads) == 2 else {}),
                                "notes": notes}),
        })
        failed = [f"{h}: {r['error']}" for h, r in zip(heads, rels, strict=True) if r["status"] == "failed"]
        if failed:
            out["error"] = "relaxation failed: " + "; ".join(failed)
        else:
            _mark_suspect(out, suspect[cid] + sanity.energy_findings(out.get("e_hull_pred_dft_hull")))
        report.append(out)
    report.extend(failed_rows)
    return write_report(report, out_dir, model_id=model_id, data_snapshot_id=snapshot, reference_diagram=hull,
                        title=f"E_hull screening of {chemsys} ({hull.thermo_type}) at {'+'.join(heads)} ({model_id})",
                        provenance=prov)
