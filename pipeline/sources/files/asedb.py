"""ASE database files (SQLite ``.db``, as orb-models and many MLIP projects ship MPtrj subsets) -> frame rows.

Rows are read with ``ase.db.connect``; ``row.toatoms()`` carries the labels (energy, forces, stress, magmoms)
on a ``SinglePointCalculator``. ASE stores stress in its own convention (eV/A^3, tensile positive), and the
shared files follow it. Evidence, from the physics check of :mod:`pipeline.sources.files.stress_check` on the
five pairs of consecutive ionic steps of mp-1095441 (calc 1) in ``orb-models/10_thin_mp_traj_systems.db``:
the energy change is explained with a median error of 0.0004 eV with the stress as stored and 0.038 eV with it
flipped (stored sign better in 4 of 5 pairs; median stress work 0.019 eV). Tested in
``tests/test_sources_asedb.py``. Against SevenNet-0 (ASE sign by construction), the stored stress components
correlate +0.999 (thin file, 11 frames) and +0.90 (``10_mptraj_systems.db``, 10 frames, no trajectory to
check otherwise); ``benchmarks/bench_import.py --stress-evidence`` prints both.

MPtrj metadata (``row.data`` with ``uid`` = MPtrj snapshot id and ``mp_id``, as in the orb-models "thin"
file) gives ``frame_id = mptrj:<uid>`` (the same id the extxyz importer gives the same frame), task id, ionic
step and fidelity ``pbe``; the other scalar data (``corrected_total_energy``, ``bandgap``, ...) and the D3
energy go to ``meta`` (the D3 forces/stress arrays are not kept). Rows without such metadata need
``fidelity=`` (or a ``fidelity`` key in the database's metadata) and get a content-hash id.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ase.db import connect
from ase.db.row import AtomsRow

from pipeline.frames import RecordError
from pipeline.sources.base import ImportResult, collect
from pipeline.sources.common import failed_file
from pipeline.sources.files.atoms_frames import (
    content_frame_id,
    labelled_atoms_row,
    mptrj_fields,
    scalar_meta,
)

SOURCE = "ase-db"

_USED_DATA = ("energy", "stress", "forces", "uid", "mp_id", "task_id", "calc_id", "ionic_step", "d3")


def row_to_frame(
    row: AtomsRow,
    *,
    fidelity: str | None = None,
    flip_stress: bool = False,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One ASE db row -> schema row (see the module doc for ids and fidelity)."""
    atoms = row.toatoms()
    data = dict(row.data or {})
    kvp = dict(row.key_value_pairs or {})
    meta = {**scalar_meta(kvp), **scalar_meta(data, skip=_USED_DATA), **(meta or {})}
    d3 = data.get("d3")
    if isinstance(d3, dict) and "energy" in d3:
        meta["d3_energy"] = float(d3["energy"])
    fields: dict[str, Any] = {}
    uid = data.get("uid", kvp.get("uid"))
    if uid is not None and ("mp_id" in data or "mp_id" in kvp):
        fields, extra = mptrj_fields(str(uid), data.get("mp_id", kvp.get("mp_id")), atoms.numbers)
        meta.update(extra)
        fidelity = fidelity or "pbe"
    if fidelity is None:
        raise RecordError("fidelity unknown (no MPtrj metadata in the row): pass fidelity=...")
    if "frame_id" not in fields:
        energy = atoms.calc.results.get("energy") if atoms.calc is not None else None
        fields["frame_id"] = content_frame_id(SOURCE, atoms, energy)
    return labelled_atoms_row(
        atoms, flip_stress=flip_stress, source=SOURCE, fidelity=fidelity, meta=meta, **fields
    )


def iter_ase_db(
    path: str | Path,
    *,
    batch_size: int = 10_000,
    fidelity: str | None = None,
    flip_stress: bool = False,
    limit: int | None = None,
) -> Iterator[ImportResult]:
    """Stream an ASE database as import results of at most ``batch_size`` rows each (options as in
    :func:`import_ase_db`); rows are read page by page (``select(limit=, offset=)``), never all at once."""
    path = Path(path)
    try:
        if not path.is_file():
            raise FileNotFoundError(f"no ASE database at {path}")
        db = connect(str(path), type="db")
        total = db.count()
        fidelity = fidelity or (db.metadata or {}).get("fidelity")
    except Exception as exc:  # noqa: BLE001 - an unreadable file is one reject
        yield failed_file(SOURCE, path, "ASE database", exc)
        return
    total = total if limit is None else min(total, limit)

    def convert(record_id: str, row: AtomsRow) -> list[dict[str, Any]]:
        meta = {"file": path.name, "row_id": row.id, "unique_id": row.unique_id}
        return [row_to_frame(row, fidelity=fidelity, flip_stress=flip_stress, meta=meta)]

    for offset in range(0, total, batch_size):
        page = db.select(limit=min(batch_size, total - offset), offset=offset, sort="id")
        yield collect(SOURCE, ((f"{path.name}:{row.id}", row) for row in page), convert)


def import_ase_db(
    path: str | Path, *, fidelity: str | None = None, flip_stress: bool = False, limit: int | None = None
) -> ImportResult:
    """Frame rows of every row of an ASE database (``limit``: only the first ``limit`` rows).

    A file that is missing or not an ASE database becomes a single reject naming the file. Large databases:
    stream with :func:`iter_ase_db`.
    """
    result = ImportResult(SOURCE)
    for part in iter_ase_db(
        path, batch_size=1 << 62, fidelity=fidelity, flip_stress=flip_stress, limit=limit
    ):
        result.extend(part)
    return result
