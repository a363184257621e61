"""Python API for notebooks: pymatgen Structures or ASE Atoms in, a pandas DataFrame of E_hull out.

    import pipeline
    df = pipeline.screen_structures([structure, atoms], "models/7net-mf-0.pt", "data/mp/entries",
                                    fidelity="r2scan", thermo_type="R2SCAN")

Calls the same :func:`pipeline.screening.screen` as ``mfhull screen`` and the flows; the report files are
written to ``out_dir`` (a temporary folder when not given).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
from ase import Atoms
from pymatgen.core import Structure
from pymatgen.io.ase import AseAtomsAdaptor

from pipeline.frames import RecordError
from pipeline.hull.candidates import candidate_row, candidates_table
from pipeline.io import read_table
from pipeline.relax.relaxer import RelaxSettings
from pipeline.schema import ENTRIES_SCHEMA
from pipeline.screening import screen

StructureLike = Structure | Atoms


def _as_structure(obj: Any, name: str) -> Structure:
    if isinstance(obj, Structure):
        return obj
    if isinstance(obj, Atoms):
        if not all(obj.pbc):
            raise RecordError(f"{name}: ASE Atoms must be periodic in all three directions (pbc={obj.pbc})")
        return AseAtomsAdaptor.get_structure(obj)
    raise RecordError(f"{name}: expected a pymatgen Structure or ASE Atoms, got {type(obj).__name__}")


def _named(structures: Iterable[StructureLike] | Mapping[str, StructureLike]) -> list[tuple[str, Any]]:
    if isinstance(structures, Mapping):
        return [(str(k), v) for k, v in structures.items()]
    if isinstance(structures, Structure | Atoms):
        structures = [structures]
    return [(f"structure-{i}", s) for i, s in enumerate(structures)]


def screen_structures(
    structures: Iterable[StructureLike] | Mapping[str, StructureLike],
    checkpoint: str | Path,
    references: str | Path | pa.Table,
    fidelity: str,
    thermo_type: str,
    *,
    model_fidelity: str | None = None,
    out_dir: str | Path | None = None,
    fmax: float = 0.05,
    steps: int = 300,
    device: str = "cpu",
) -> pd.DataFrame:
    """Relax ``structures`` with the potential in ``checkpoint`` at ``fidelity`` and return one row per
    structure (REPORT_SCHEMA columns: predicted E_hull vs the DFT and all-model hulls, relaxation status,
    error). ``structures``: Structures / Atoms (named ``structure-<i>``) or a mapping {name: structure}.
    ``references``: an entries dataset folder or table (ENTRIES_SCHEMA). A structure that cannot be used is a
    row with its error; the others are still screened."""
    rows, rejects = [], []
    for name, obj in _named(structures):
        try:
            rows.append(candidate_row(name, _as_structure(obj, name), source="api", origin="python"))
        except RecordError as exc:
            rejects.append({"record_id": name, "error": str(exc)})
    if not rows:
        raise ValueError(f"no usable structures: {[r['error'] for r in rejects]}")
    refs = references if isinstance(references, pa.Table) else read_table(references, ENTRIES_SCHEMA)
    with tempfile.TemporaryDirectory(prefix="mfhull-api-") as tmp:
        out = Path(out_dir) if out_dir is not None else Path(tmp)
        files = screen(candidates_table(rows), refs, checkpoint=checkpoint, thermo_type=thermo_type,
                       fidelity=fidelity, model_fidelity=model_fidelity, out_dir=out, candidate_rejects=rejects,
                       relax=RelaxSettings(fmax=fmax, steps=steps), device=device)
        return read_table(files["report"]).to_pandas()
