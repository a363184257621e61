"""Extended XYZ frames (MPtrj, Alexandria and other labelled sets) -> frame rows.

Parsing is ASE's extxyz reader, frame by frame: the file is cut at the atom-count lines first, so one
malformed frame becomes a reject and the frames after it still import.

Recognised sets (``source`` key of the frame's info line, as written by the mattersim benchmark files):

* ``source=MPtrj``: Materials Project relaxation steps (VASP PBE / PBE+U, MP input sets) -> fidelity ``pbe``.
  ``mptrj_snapshot_id`` (``<task_id>-<calc_id>-<ionic_step>``) gives ``frame_id = mptrj:<snapshot id>``,
  task id and ionic step; ``mptrj_traj_id`` is the material id. MPtrj does not record GGA vs GGA+U per frame:
  ``run_type`` follows MP's own rule (:func:`pipeline.sources.atoms_frames.mp_run_type`).
* ``source=Alexandria``: Alexandria PBE frames -> fidelity ``alexandria-pbe``. Alexandria is a separate
  database computed with its own workflow: MP-compatible PBE(+U) parameters, but not MP's exact runs (code
  versions, k-point meshes, relaxation protocol), so its total energies are not guaranteed to sit on MP's
  GGA scale. A separate fidelity name keeps them from being mixed with ``pbe`` energies unless a model or a
  fitted shift says they may be. ``alexandria_id`` is the material id; ``frame_id = alexandria:<id>``.
* Anything else needs ``fidelity=`` from the caller; the frame id is then a content hash unless the frame
  carries ``frame_id`` in its info.

Energies are the raw, uncorrected VASP totals (``energy=`` in the info line; MPtrj's ``corrected_total_energy``
is not used).

Stress sign -- evidence that the mattersim files already use the ASE convention (eV/A^3, tensile positive),
so no conversion is applied (``flip_stress=True`` exists for files that do not):

1. Model check, measured with SevenNet-0 (an ASE calculator whose stress is the strain derivative of its own
   energy, hence ASE sign by construction) on the first 120 frames with <= 40 atoms of each file
   (``benchmarks/bench_import.py --stress-evidence`` reproduces it): ``mptrj-random-1k``: correlation of all
   9 stress components with the model 0.983, least-squares slope of the label pressure on the model pressure
   0.98, same sign in 30/30 frames with |pressure| > 0.006 eV/A^3; ``mptrj-highest-stress-1k``: slope 1.01,
   same sign in 106/120 (correlation of components 0.46: these are outliers, see below).
   Flipping the sign would give correlation -0.98. ``alexandria-random-1k`` is almost stress-free (5-95 %
   pressure range -0.002 .. 0.004 eV/A^3, below the model's error); on its 26 frames with
   |pressure| > 0.006 eV/A^3 the pressure correlates +0.59 with the model (17/26 same sign): weaker, but
   it points the same way, and the file comes from the same writer with the same ``stress_unit`` key.
2. Physics check (:mod:`pipeline.sources.stress_check`, tested in ``tests/test_sources_extxyz.py``): on the
   10 pairs of consecutive ionic steps in ``mptrj-highest-stress-1k`` the energy change is better explained
   with the stress as labelled than flipped in 9 of 10 (median errors 4.4 vs 6.3 eV; these frames are far
   from equilibrium, so the first-order balance is rough). The same check on the orb-models MPtrj ASE db
   (:mod:`pipeline.sources.asedb`) gives median errors 0.0004 eV as labelled vs 0.038 eV flipped.

Observed, not fixed: in ``mptrj-highest-stress-1k`` the stress magnitudes of some relaxations (e.g.
mp-675106, mp-675893) overstate the energy change along the trajectory by 4-10x (pressure ~0.8 eV/A^3 =
130 GPa). Treat that file as robustness input, not as training labels of record.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import ase.io
import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from pipeline.frames import RecordError
from pipeline.sources.atoms_frames import (
    check_units,
    content_frame_id,
    labelled_atoms_row,
    mptrj_fields,
    scalar_meta,
)
from pipeline.sources.base import ImportResult, collect
from pipeline.sources.common import failed_file, read_bytes

SOURCE = "extxyz"

#: info["source"] -> (frames.source, fidelity)
KNOWN_SETS = {
    "mptrj": ("mptrj-extxyz", "pbe"),
    "alexandria": ("alexandria-extxyz", "alexandria-pbe"),
}

#: info keys that become schema fields (or were checked) and are not repeated in ``meta``
_USED_INFO = (
    "mptrj_traj_id",
    "mptrj_snapshot_id",
    "alexandria_id",
    "frame_id",
    "source",
    "energy_unit",
    "forces_unit",
    "stress_unit",
)


def split_frames(text: str) -> Iterator[tuple[int, str | Exception]]:
    """(frame index, text of one frame) for each frame of an (ext)xyz text; a broken frame yields an error.

    After a broken atom-count line the reader skips ahead to the next line that is a bare integer followed by
    an extxyz comment line (``Lattice=`` or ``Properties=``).
    """
    lines = text.splitlines()
    i, index = 0, 0
    while i < len(lines):
        if not lines[i].strip():
            i += 1
            continue
        head = lines[i].strip()
        if not head.isdigit():
            yield index, RecordError(f"line {i + 1}: expected an atom count, got {head[:40]!r}")
            index += 1
            i = _resync(lines, i + 1)
            continue
        n = int(head)
        end = i + 2 + n
        next_header = _resync(lines, i + 2)
        if end > len(lines) or next_header < end or any(not b.strip() for b in lines[i + 2 : end]):
            yield index, RecordError(f"line {i + 1}: frame announces {n} atoms but has fewer atom lines")
            index += 1
            i = next_header
            continue
        yield index, "\n".join(lines[i:end]) + "\n"
        index += 1
        i = end


def _is_header(lines: list[str], j: int) -> bool:
    return (
        lines[j].strip().isdigit()
        and j + 1 < len(lines)
        and ("Lattice=" in lines[j + 1] or "Properties=" in lines[j + 1])
    )


def _resync(lines: list[str], start: int) -> int:
    """Index of the next frame header (atom count + extxyz comment line) at or after ``start``."""
    return next((j for j in range(start, len(lines)) if _is_header(lines, j)), len(lines))


def _read_frame(text: str) -> Atoms:
    try:
        return ase.io.read(io.StringIO(text), format="extxyz")
    except Exception as exc:  # ASE raises several types for malformed frames
        raise RecordError(f"unparseable extxyz frame: {exc}") from exc


def _check_label_keys(label_keys: Mapping[str, str]) -> None:
    unknown = set(label_keys) - {"energy", "forces", "stress"}
    if unknown:
        raise ValueError(f"label_keys may name energy, forces and stress, not {sorted(unknown)}")


def relabel(atoms: Atoms, label_keys: Mapping[str, str]) -> Atoms:
    """Move labels stored under other names (e.g. ``{"energy": "REF_energy", "forces": "REF_forces",
    "stress": "REF_stress"}``, as MACE-style training files have them) onto a SinglePointCalculator."""
    _check_label_keys(label_keys)
    results: dict[str, Any] = dict(atoms.calc.results) if atoms.calc is not None else {}
    for label, key in label_keys.items():
        store = atoms.arrays if label == "forces" else atoms.info
        if key in store:
            value = np.asarray(store.pop(key), dtype=float)
            results[label] = value.reshape(3, 3) if label == "stress" and value.size == 9 else value
    atoms.calc = SinglePointCalculator(atoms, **results) if results else None
    return atoms


def atoms_to_row(
    atoms: Atoms,
    *,
    fidelity: str | None = None,
    flip_stress: bool = False,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One labelled extxyz frame -> schema row (see the module doc for ids and fidelities)."""
    info = dict(atoms.info)
    check_units(info)
    set_name = str(info.get("source", "")).strip().lower()
    source, default_fidelity = KNOWN_SETS.get(set_name, (SOURCE, None))
    fields: dict[str, Any] = {}
    meta = dict(meta or {})
    if set_name == "mptrj":
        if "mptrj_snapshot_id" not in info:
            raise RecordError("MPtrj frame without mptrj_snapshot_id")
        fields, extra = mptrj_fields(info["mptrj_snapshot_id"], info.get("mptrj_traj_id"), atoms.numbers)
        meta.update(extra)
    elif set_name == "alexandria":
        if "alexandria_id" not in info:
            raise RecordError("Alexandria frame without alexandria_id")
        alex_id = str(info["alexandria_id"])
        fields = {"frame_id": f"alexandria:{alex_id}", "material_id": alex_id}
    fidelity = fidelity or default_fidelity
    if fidelity is None:
        raise RecordError(f"fidelity unknown for source {info.get('source')!r}: pass fidelity=...")
    energy = atoms.calc.results.get("energy") if atoms.calc is not None else None
    if "frame_id" not in fields:
        fields["frame_id"] = (
            str(info["frame_id"]) if "frame_id" in info else content_frame_id(source, atoms, energy)
        )
    meta = {**scalar_meta(info, skip=_USED_INFO), **meta}
    return labelled_atoms_row(
        atoms, flip_stress=flip_stress, source=source, fidelity=fidelity, meta=meta, **fields
    )


def import_extxyz(
    path: str | Path,
    *,
    fidelity: str | None = None,
    flip_stress: bool = False,
    limit: int | None = None,
    label_keys: Mapping[str, str] | None = None,
) -> ImportResult:
    """Frame rows of every frame of an extxyz file, plain or gzipped (``limit``: the first frames only).

    ``fidelity`` overrides the fidelity of recognised sets and is required for others; ``flip_stress`` for
    files whose stress uses the VASP sign (compressive positive, still in eV/A^3); ``label_keys`` for files
    whose labels have other names (see :func:`relabel`).
    """
    if label_keys:
        _check_label_keys(label_keys)
    path = Path(path)
    try:
        text = read_bytes(path).decode()
    except (OSError, UnicodeDecodeError, EOFError) as exc:
        return failed_file(SOURCE, path, "extxyz file", exc)

    def records() -> Iterator[tuple[str, str | Exception]]:
        for index, chunk in split_frames(text):
            if limit is not None and index >= limit:
                return
            yield f"{path.name}:{index}", chunk

    def convert(record_id: str, chunk: str | Exception) -> list[dict[str, Any]]:
        if isinstance(chunk, Exception):
            raise chunk
        index = int(record_id.rsplit(":", 1)[1])
        atoms = _read_frame(chunk)
        if label_keys:
            relabel(atoms, label_keys)
        return [
            atoms_to_row(
                atoms, fidelity=fidelity, flip_stress=flip_stress, meta={"file": path.name, "index": index}
            )
        ]

    return collect(SOURCE, records(), convert)
