"""The steps of a screening campaign as plain functions over files: gather reference entries, make candidates,
get a model, relax candidates in batches. The ``campaign`` flow and ``mfhull campaign`` chain them (with
:func:`pipeline.screening.screen` and :func:`pipeline.sources.mp.ingest_mp`); nothing here knows Prefect.

Every step reads and writes files (Parquet datasets, checkpoints) so that a workflow engine can pass paths
between steps, cache them on content, and run batches on other machines.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
from pymatgen.core import Structure

from pipeline.hull.candidates import (
    candidates_table,
    read_candidate_files,
    row_structure,
    substitute_prototypes,
)
from pipeline.io import ParquetDataset, read_table, write_table_atomic
from pipeline.quiet import summarised_warnings
from pipeline.schema import ENTRIES_SCHEMA, KEYS, REJECTS_SCHEMA

log = logging.getLogger(__name__)

#: Thermo type of the reference hull for a fidelity (MP's names; anything else is compared raw).
THERMO_TYPES = {"r2scan": "R2SCAN", "pbe": "GGA_GGA+U"}
#: Names accepted for the pretrained SevenNet-MF-0 (shipped with the sevenn extra).
SEVENN_MF0 = ("7net-mf-0", "sevennet-mf-0")


def thermo_type_for(fidelity: str) -> str:
    """R2SCAN for r2scan, GGA_GGA+U for pbe, raw for anything else (e.g. this project's gpaw-* labels)."""
    return THERMO_TYPES.get(fidelity.lower(), "raw")


def is_dataset(path: str | Path) -> bool:
    """A folder of ``part-*.parquet`` files (an entries/frames dataset written by this project)."""
    return bool(ParquetDataset(path, None).parts())


def gather_entries(paths: Iterable[str | Path], out_dir: str | Path) -> dict[str, Any]:
    """Collect reference entries into ``out_dir/entries``: entries datasets are copied row by row, any other
    file or folder is imported (entry JSON, .res, MP task docs, vasprun...; sources.files). Returns counts."""
    from pipeline.sources.files import import_to_dataset

    out_dir = Path(out_dir)
    store = ParquetDataset(out_dir / "entries", ENTRIES_SCHEMA, KEYS["entries"])
    counts: dict[str, Any] = {"entries_written": 0, "rejects": 0, "paths": []}
    for path in map(Path, paths):
        if not path.exists():
            raise FileNotFoundError(f"entries path {path}: no such file or folder")
        if is_dataset(path):
            n = store.append(read_table(path, ENTRIES_SCHEMA))
            counts["entries_written"] += n
            counts["paths"].append({"path": str(path), "entries_written": n})
            continue
        with summarised_warnings(log, f"importing {path.name}"):
            result = import_to_dataset(path, out_dir)
        counts["entries_written"] += result.get("entries_written", 0)
        counts["rejects"] += result.get("rejects_written", 0)
        counts["paths"].append({"path": str(path), **result})
    if not store.exists():
        raise ValueError(f"no entries found in {[str(p) for p in paths]}: give entry files or an entries dataset")
    return counts


def make_candidates(
    chemsys: str,
    out_dir: str | Path,
    *,
    files: Sequence[str | Path] = (),
    substitute: bool = False,
    prototypes: str | Path | None = None,
    references: str | Path | None = None,
    max_candidates: int | None = 20,
    seed: int = 0,
) -> dict[str, Any]:
    """Write ``out_dir/candidates.parquet`` (CANDIDATES_SCHEMA) and ``out_dir/candidate_rejects.parquet``.

    files: CIF/POSCAR/extxyz/JSON files or folders. substitute: prototype substitution into ``chemsys`` from the
    structures of the ``prototypes`` entries dataset (other chemical systems with as many elements), dropping
    any that match a known structure of ``chemsys`` in that dataset or in the ``references`` entries dataset;
    at most ``max_candidates`` of them.
    """
    if not files and not substitute:
        raise ValueError("no candidates: give candidate files or ask for prototype substitution")
    out_dir = Path(out_dir)
    rows: list[dict[str, Any]] = []
    rejects: list[dict[str, str]] = []
    if files:
        with summarised_warnings(log, "reading candidate files"):
            read = read_candidate_files(files)
        rows += read.rows
        rejects += read.rejects
    if substitute:
        if prototypes is None or not is_dataset(prototypes):
            raise ValueError(f"prototype substitution needs an entries dataset of prototypes, got {prototypes}")
        protos = read_table(prototypes, ENTRIES_SCHEMA)
        known_rows = protos.to_pylist()
        if references is not None and Path(references) != Path(prototypes) and is_dataset(references):
            known_rows += read_table(references, ENTRIES_SCHEMA).to_pylist()
        known = [row_structure(r) for r in known_rows if r["chemsys"] == chemsys and r["structure"]]
        with summarised_warnings(log, "prototype substitution"):
            made = substitute_prototypes(protos, chemsys, max_candidates=max_candidates, seed=seed, known=known)
        rows += made.rows
        rejects += made.rejects
    if not rows:
        raise ValueError(f"no valid candidates for {chemsys} ({len(rejects)} rejected)")
    paths = {"candidates": write_table_atomic(candidates_table(rows), out_dir / "candidates.parquet")}
    if rejects:
        paths["rejects"] = write_table_atomic(pa.Table.from_pylist(rejects, schema=REJECTS_SCHEMA),
                                              out_dir / "candidate_rejects.parquet")
    log.info("%d candidates for %s (%d rejected)", len(rows), chemsys, len(rejects))
    return {"n": len(rows), "n_rejected": len(rejects), **{k: str(v) for k, v in paths.items()}}


def read_candidates(path: str | Path) -> tuple[pa.Table, list[dict[str, str]]]:
    """The candidates table written by :func:`make_candidates` and its rejects (record_id, error)."""
    from pipeline.schema import CANDIDATES_SCHEMA

    path = Path(path)
    rejects_path = path.with_name("candidate_rejects.parquet")
    rejects = read_table(rejects_path).to_pylist() if rejects_path.exists() else []
    return read_table(path, CANDIDATES_SCHEMA), rejects


def pretrained_checkpoint(name: str, out_dir: str | Path) -> Path:
    """The pretrained SevenNet-MF-0 converted to an mfhull checkpoint at ``out_dir/<name>.pt`` (made once)."""
    from pipeline.model import import_sevenn, save_checkpoint

    if name.lower() not in SEVENN_MF0:
        raise ValueError(f"unknown pretrained model {name!r}: expected one of {SEVENN_MF0} or a checkpoint path")
    path = Path(out_dir) / "7net-mf-0.pt"
    if not path.exists():
        save_checkpoint(import_sevenn("7net-mf-0"), path, extra={"imported_from": "7net-mf-0"})
    return path


def structures_to_relax(
    candidates_path: str | Path,
    references_dir: str | Path | None = None,
    *,
    thermo_type: str = "raw",
    fidelity: str = "unknown",
    reference_window: float | None = None,
) -> dict[str, list[tuple[str, Structure]]]:
    """{"candidate": [(id, structure)...], "reference": [...]}: what :func:`pipeline.screening.screen` relaxes
    for these candidates (the reference phases within ``reference_window`` of the DFT hull of their system)."""
    from pipeline.hull import build_reference_hull
    from pipeline.screening import candidates_chemsys, model_hull_phases

    table, _ = read_candidates(candidates_path)
    rows = table.to_pylist()
    out = {"candidate": [(r["candidate_id"], row_structure(r)) for r in rows], "reference": []}
    if references_dir is not None:
        hull = build_reference_hull(read_table(references_dir, ENTRIES_SCHEMA), thermo_type,
                                    chemsys=candidates_chemsys(rows),
                                    fidelity=fidelity)
        phases, _ = model_hull_phases(hull, reference_window, (fidelity,))
        out["reference"] = [(i, s) for i, s, _ in phases]
    return out


def relax_batch(
    items: Sequence[tuple[str, Structure]],
    checkpoint: str | Path,
    fidelity: str,
    relax_dir: str | Path,
    *,
    role: str = "candidate",
    model_fidelity: str | None = None,
    fmax: float = 0.05,
    steps: int = 500,
    device: str = "cpu",
) -> dict[str, int]:
    """Relax (id, structure) items into the relaxation store ``relax_dir`` (the one
    :func:`pipeline.screening.screen` reads from ``<out_dir>/relaxations``), so that batches can run anywhere
    and screening reuses them; returns counts per status."""
    from pipeline.relax.calculator import MFPotentialCalculator
    from pipeline.relax.relaxer import RelaxSettings, relax_many
    from pipeline.screening import file_id

    calc = MFPotentialCalculator.from_checkpoint(checkpoint, model_fidelity or fidelity, device=device)
    with summarised_warnings(log, f"relaxing {len(items)} {role} structures"):
        rows = relax_many(items, calc, RelaxSettings(fmax=fmax, steps=steps), model_id=file_id(checkpoint),
                          fidelity=fidelity, model_fidelity=model_fidelity or fidelity, role=role,
                          out=relax_dir).to_pylist()
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    return counts


def batches(items: Sequence[Any], size: int) -> list[list[Any]]:
    """``items`` cut into consecutive lists of at most ``size``."""
    if size < 1:
        raise ValueError(f"batch size must be >= 1, got {size}")
    return [list(items[i: i + size]) for i in range(0, len(items), size)]


def top_candidates(report_path: str | Path, n: int = 10) -> list[dict[str, Any]]:
    """The ``n`` candidates with the lowest predicted E_hull (vs the DFT hull) of a report, for a summary."""
    rows = [r for r in read_table(report_path).to_pylist() if r.get("e_hull_pred_dft_hull") is not None]
    rows.sort(key=lambda r: r["e_hull_pred_dft_hull"])
    keep = ("candidate_id", "formula", "e_hull_pred_dft_hull", "e_hull_pred_model_hull", "e_hull_true",
            "relax_status")
    return [{k: r.get(k) for k in keep} for r in rows[:n]]


def failures(report_path: str | Path) -> list[dict[str, Any]]:
    """Report rows with an error (unreadable, failed relaxation, no hull): candidate_id and error."""
    return [{"candidate_id": r["candidate_id"], "error": r["error"]}
            for r in read_table(report_path).to_pylist() if r.get("error")]


def summary_metrics(summary_json: str | Path) -> list[dict[str, Any]]:
    """The headline metrics rows of a report's summary.json."""
    return json.loads(Path(summary_json).read_text()).get("metrics", [])
