"""MatPES records (matcalc's element references, or any MatPES JSON of the same shape) -> frames and entries.

A MatPES record holds one static VASP calculation: ``structure`` (pymatgen dict), ``energy`` (total, eV),
``forces`` (eV/A), ``stress`` (6-vector, kBar), ``functional`` (PBE | r2SCAN), ``matpes_id`` and provenance
(``original_mp_id``). MatPES runs PBE_64 POTCARs at 680 eV, so its energies are NOT on MP's GGA/r2SCAN
scale (Ni: MatPES-PBE -5.483 vs MP GGA -5.780 eV/atom): fidelities are ``matpes-pbe`` / ``matpes-r2scan``,
entries have ``thermo_type="raw"`` (no correction scheme applies).

Stress layout and sign, checked on the shared element references (tests in ``tests/test_sources_matpes.py``):

* Order is Voigt ``xx yy zz yz xz xy`` (not VASP's ``xx yy zz xy yz zx``), from crystal symmetry: the only
  non-zero shear component is ``xy`` for Ga (Cmce) and Pu (P6_3/m), whose c axis lies along z; ``xz`` for Se
  (P2_1/c, unique axis b along y); ``yz`` for P (P2/c, unique axis a along x).
* Sign is VASP's (compressive positive), from physics: 63 of 89 elements share one structure in both files,
  and it is the r2SCAN-relaxed one (median r2SCAN mean normal stress -0.1 kBar, 10-90 % within +-4 kBar).
  PBE binds more weakly than r2SCAN and wants a larger cell, so at the r2SCAN volume the PBE cell is
  compressed; its stored stress is positive (median +9.3 kBar, Ni +71 kBar), which is VASP's sign. Frames
  store ``-stress * 0.1 GPa`` (ASE, eV/A^3, tensile positive) via :func:`pipeline.units.vasp_kbar_to_ase_stress`.

matcalc's ``MP-PBE-Element-Refs.json.gz`` (``{element: {"structure": [...], "energy_per_atom": [...]}}``, MP GGA
elemental polymorphs without ids) is read by :func:`import_mp_element_refs` as GGA entries with
``thermo_type="GGA_GGA+U"``: MP2020 applies no correction to pure elements, and the lowest energy per element
equals the matbench-discovery MP elemental reference entries (correction 0) for 84 of 88 elements, the others
(Br, I, Bi, O) being 1-84 meV/atom lower (newer polymorphs).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pymatgen.core.entries import ComputedStructureEntry

from pipeline.entries import entry_to_row
from pipeline.frames import RecordError, frame_row
from pipeline.sources.base import ImportResult, collect
from pipeline.sources.common import failed_file, read_json, record_structure, require
from pipeline.units import vasp_kbar_to_ase_stress

SOURCE = "matpes"
SOURCE_MP_REFS = "matcalc-mp-element-refs"

#: MatPES functional -> fidelity
FIDELITY = {"PBE": "matpes-pbe", "R2SCAN": "matpes-r2scan"}

Part = Literal["frames", "entries"]
_PART_TAG = {"frames": "frame", "entries": "entry"}


def voigt_kbar_to_ase(stress6: Any) -> np.ndarray:
    """MatPES stress (Voigt xx yy zz yz xz xy, kBar, VASP sign) -> 3x3 ASE stress (eV/A^3, tensile positive)."""
    s = np.asarray(stress6, dtype=float)
    if s.shape != (6,):
        raise RecordError(f"stress shape {s.shape}, expected a 6-vector")
    xx, yy, zz, yz, xz, xy = s
    return vasp_kbar_to_ase_stress([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])


def _functional(record: Mapping[str, Any]) -> tuple[str, str]:
    """(run type as MP spells it, fidelity) of a record."""
    require(record, "functional")
    key = str(record["functional"]).strip().upper()
    if key not in FIDELITY:
        raise RecordError(f"unknown MatPES functional {record['functional']!r}; known: PBE, r2SCAN")
    return key, FIDELITY[key]


def _ids(record: Mapping[str, Any]) -> tuple[str, str | None]:
    require(record, "matpes_id")
    original = (record.get("provenance") or {}).get("original_mp_id")
    return str(record["matpes_id"]), None if original is None else str(original)


def _meta(record: Mapping[str, Any], name: str) -> dict[str, Any]:
    keep = ("bandgap", "energy_atomic", "cohesive_energy_per_atom", "functional")
    meta = {k: record[k] for k in keep if record.get(k) is not None}
    prov = record.get("provenance") or {}
    meta.update({k: v for k, v in prov.items() if v is not None and k != "original_mp_id"})
    meta["file"] = name
    return meta


def record_to_frame(record: Mapping[str, Any], name: str = "") -> dict[str, Any]:
    """One MatPES record -> frame row (energy, forces, ASE stress, magmoms from the structure)."""
    run_type, fidelity = _functional(record)
    require(record, "energy")
    structure = record_structure(record)
    matpes_id, original = _ids(record)
    magmoms = structure.site_properties.get("magmom")
    return frame_row(
        frame_id=f"{fidelity}:{matpes_id}",
        source=SOURCE,
        fidelity=fidelity,
        numbers=structure.atomic_numbers,
        positions=structure.cart_coords,
        cell=structure.lattice.matrix,
        energy=record["energy"],
        forces=record.get("forces"),
        stress=None if record.get("stress") is None else voigt_kbar_to_ase(record["stress"]),
        magmoms=magmoms,
        material_id=original,
        run_type=run_type,
        meta={**_meta(record, name), "matpes_id": matpes_id},
    )


def record_to_entry(record: Mapping[str, Any], name: str = "") -> ComputedStructureEntry:
    """One MatPES record -> ComputedStructureEntry (raw energy; parameters name the MatPES settings)."""
    run_type, fidelity = _functional(record)
    require(record, "energy")
    structure = record_structure(record)
    matpes_id, original = _ids(record)
    parameters = {"run_type": run_type, "calc_set": "MatPES", "potcar_functional": "PBE_64", "encut": 680}
    data = {**_meta(record, name), "matpes_id": matpes_id, "material_id": original}
    return ComputedStructureEntry(
        structure,
        float(record["energy"]),
        parameters=parameters,
        data=data,
        entry_id=f"{matpes_id}-{fidelity}",
    )


def _records(data: Any, name: str) -> Iterator[tuple[str, Any]]:
    if isinstance(data, Mapping):
        items = data.items()
    elif isinstance(data, list):
        items = (
            (str(r.get("matpes_id", i)) if isinstance(r, Mapping) else str(i), r) for i, r in enumerate(data)
        )
    else:
        raise RecordError(f"{name}: expected a list or mapping of MatPES records, got {type(data).__name__}")
    for key, record in items:
        yield f"{name}:{key}", record


def import_matpes(path: str | Path, *, parts: tuple[Part, ...] = ("frames", "entries")) -> ImportResult:
    """Frame and/or entry rows of every record of a MatPES JSON(.gz); a record failing either part is a reject.

    Reject ids are ``<file>:<key>`` with ``#frame`` or ``#entry`` appended, so both parts of one bad record
    are reported.
    """
    unknown = set(parts) - set(_PART_TAG)
    if unknown or not parts:
        raise ValueError(f"parts must be a non-empty subset of {tuple(_PART_TAG)}, got {parts!r}")
    path = Path(path)
    try:
        records = list(_records(read_json(path), path.name))
    except Exception as exc:  # noqa: BLE001 - an unreadable file is one reject
        return failed_file(SOURCE, path, "MatPES file", exc)

    def expand() -> Iterator[tuple[str, Any]]:
        for record_id, record in records:
            for part in parts:
                yield f"{record_id}#{_PART_TAG[part]}", record

    def convert(record_id: str, record: Any) -> list[dict[str, Any]]:
        if not isinstance(record, Mapping):
            raise RecordError(f"record is a {type(record).__name__}, not a mapping")
        if record_id.endswith("#frame"):
            return [record_to_frame(record, path.name)]
        entry = record_to_entry(record, path.name)
        return [
            entry_to_row(
                entry,
                source=SOURCE,
                thermo_type="raw",
                fidelity=FIDELITY[_functional(record)[0]],
                meta={"file": path.name},
            )
        ]

    return collect(SOURCE, expand(), convert)


def import_mp_element_refs(path: str | Path) -> ImportResult:
    """Entries of matcalc's MP-PBE-Element-Refs (MP GGA elemental polymorphs; see the module doc)."""
    path = Path(path)
    try:
        data = read_json(path, expect=dict)
    except Exception as exc:  # noqa: BLE001 - an unreadable file is one reject
        return failed_file(SOURCE_MP_REFS, path, "MP elemental references file", exc)

    def records() -> Iterator[tuple[str, tuple[str, Any, Any]]]:
        for element, value in data.items():
            if not isinstance(value, Mapping):
                yield f"{path.name}:{element}", (element, None, None)
                continue
            structures = value.get("structure") or []
            energies = value.get("energy_per_atom") or []
            if len(structures) != len(energies):
                yield f"{path.name}:{element}", (element, structures, None)
                continue
            for i, (s, e) in enumerate(zip(structures, energies, strict=True)):
                yield f"{path.name}:{element}:{i}", (element, s, e)

    def convert(record_id: str, item: tuple[str, Any, Any]) -> list[dict[str, Any]]:
        element, struct, epa = item
        if struct is None or epa is None:
            raise RecordError(f"element {element}: need equally long 'structure' and 'energy_per_atom' lists")
        structure = record_structure({"structure": struct})
        if {el.symbol for el in structure.composition.elements} != {element}:
            raise RecordError(
                f"structure is {structure.composition.reduced_formula}, not elemental {element}"
            )
        energy = float(epa) * len(structure)
        entry = ComputedStructureEntry(
            structure,
            energy,
            parameters={"run_type": "GGA"},
            data={"file": path.name},
            entry_id=f"mp-pbe-ref:{record_id.split(':', 1)[1]}",
        )
        return [entry_to_row(entry, source=SOURCE_MP_REFS, thermo_type="GGA_GGA+U", meta={"file": path.name})]

    return collect(SOURCE_MP_REFS, records(), convert)
