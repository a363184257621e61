"""Candidate structures for screening: user files, and prototype substitution into a target chemical system.

Files are read with pymatgen (CIF, POSCAR/CONTCAR/vasp, pymatgen JSON) and ASE (extxyz/xyz, several frames per
file); a file or frame that cannot be read becomes a reject with its error, the rest are kept.

Prototype substitution (as in WBM-style screening, Wang et al. 2021): structures of OTHER chemical systems with
the right number of elements get their species replaced by the target's elements; the results are deduplicated
with pymatgen's StructureMatcher (also against known structures), then capped by a seeded random sample. The
element assignment is by electronegativity order (the most electronegative prototype element becomes the most
electronegative target element: anions stay anions), or every permutation.
"""

from __future__ import annotations

import io
import itertools
import json
import random
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
from ase.io import read as ase_read
from monty.serialization import loadfn
from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Composition, Element, Structure
from pymatgen.core.entries import ComputedStructureEntry
from pymatgen.io.ase import AseAtomsAdaptor
from pymatgen.io.cif import CifFile, CifParser

from pipeline.entries import row_to_entry
from pipeline.frames import RecordError
from pipeline.hull.phase_diagram import chemsys_elements
from pipeline.schema import CANDIDATES_SCHEMA
from pipeline.sources.base import ImportResult
from pipeline.sources.common import read_bytes
from pipeline.sources.files.extxyz import split_frames

SOURCE_FILE = "file"
SOURCE_SUBSTITUTION = "substitution"
#: Atoms closer than this (Angstrom) make a structure invalid.
MIN_DISTANCE = 0.5



def check_structure(structure: Structure, name: str) -> Structure:
    """Raise RecordError when a structure is empty, flat or has overlapping atoms."""
    if len(structure) == 0:
        raise RecordError(f"{name}: no atoms")
    if structure.lattice.volume < 1e-3:
        raise RecordError(f"{name}: zero-volume cell")
    if not structure.is_ordered:
        raise RecordError(f"{name}: disordered structure (partial occupancies); order it first")
    if len(structure) > 1 and not structure.is_valid(tol=MIN_DISTANCE):
        raise RecordError(f"{name}: atoms closer than {MIN_DISTANCE} A")
    return structure


def candidate_row(
    candidate_id: str,
    structure: Structure,
    *,
    source: str,
    origin: str,
    substitution: Mapping[str, str] | None = None,
    meta: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Validated CANDIDATES_SCHEMA row."""
    check_structure(structure, candidate_id)
    comp = structure.composition
    return {
        "candidate_id": str(candidate_id),
        "formula": comp.reduced_formula,
        "chemsys": comp.chemical_system,
        "source": source,
        "origin": str(origin),
        "substitution": None if substitution is None else json.dumps(dict(substitution), sort_keys=True),
        "nsites": len(structure),
        "structure": json.dumps(structure.as_dict()),
        "meta": json.dumps(dict(meta), sort_keys=True, default=str) if meta else None,
    }


def candidates_table(rows: Iterable[Mapping[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(list(rows), schema=CANDIDATES_SCHEMA)


def row_structure(row: Mapping[str, Any]) -> Structure:
    return Structure.from_dict(json.loads(row["structure"]))


# ---------------------------------------------------------------------------------------------- user files

_ID_KEYS = ("candidate_id", "material_id", "name", "id")


def _periodic_structure(atoms: Any, what: str) -> Structure:
    if not all(atoms.pbc):
        raise RecordError(f"{what} is not periodic in 3D (no cell or pbc=F): a candidate needs a crystal cell")
    return AseAtomsAdaptor.get_structure(atoms)


def _extxyz_structures(path: Path) -> list[tuple[str | None, Structure | Exception]]:
    """One item per frame: a truncated or malformed frame is an error item, the frames around it still read."""
    out: list[tuple[str | None, Structure | Exception]] = []
    text = read_bytes(path).decode("utf-8", errors="strict")
    for index, chunk in split_frames(io.StringIO(text)):
        if isinstance(chunk, Exception):
            out.append((None, chunk))
            continue
        try:
            atoms = ase_read(io.StringIO(chunk), format="extxyz")
            fid = next((str(atoms.info[k]) for k in _ID_KEYS if k in atoms.info), None)
            out.append((fid, _periodic_structure(atoms, f"frame {index}")))
        except Exception as exc:  # noqa: BLE001 - ASE raises several types for a bad frame
            out.append((None, RecordError(f"frame {index}: not readable as extxyz ({_words(exc)})")))
    return out


def _cif_structures(path: Path) -> list[tuple[str | None, Structure | Exception]]:
    """One item per CIF data block: a bad block is an error item (with pymatgen's warnings as the reason)."""
    cif = CifFile.from_str(read_bytes(path).decode("utf-8", errors="replace"))
    if not cif.data:
        raise RecordError("no data_ block in the CIF file")
    out: list[tuple[str | None, Structure | Exception]] = []
    for name, block in cif.data.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                structures = CifParser.from_str(str(block)).parse_structures(primitive=False)
                error = None if structures else "no structure"
            except Exception as exc:  # noqa: BLE001 - pymatgen raises several types for a bad block
                structures, error = [], _words(exc)
        if error is not None:
            why = "; ".join(dict.fromkeys(str(w.message).splitlines()[0] for w in caught if str(w.message)))
            out.append((None, RecordError(f"CIF block {name!r}: {why or error}")))
        out.extend((None, s) for s in structures)
    return out


def _words(exc: BaseException) -> str:
    """An exception as words: its message, with the type only when the message is empty or unhelpful."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if len(text) < 12 else text


def _structures_in_file(path: Path) -> list[tuple[str | None, Structure | Exception]]:
    """(id from the file or None, structure or the error of that one structure) for each structure in a file."""
    name = path.name.lower()
    if path.stat().st_size == 0:
        raise RecordError("empty file")
    if name.endswith((".extxyz", ".xyz", ".extxyz.gz", ".xyz.gz")):
        return _extxyz_structures(path)
    if name.endswith((".cif", ".mcif")):
        return _cif_structures(path)
    if name.endswith((".json", ".json.gz")):
        obj = loadfn(path)
        items = obj if isinstance(obj, list) else [obj]
        out: list[tuple[str | None, Structure | Exception]] = []
        for i, item in enumerate(items):
            if isinstance(item, ComputedStructureEntry):
                out.append((str(item.entry_id) if item.entry_id else None, item.structure))
            elif isinstance(item, Structure):
                out.append((None, item))
            else:
                out.append((None, RecordError(f"item {i} is not a pymatgen Structure/ComputedStructureEntry "
                                              f"({type(item).__name__})")))
        return out
    try:
        return [(None, Structure.from_file(path))]  # POSCAR, CONTCAR, *.vasp and the rest pymatgen recognises
    except Exception as exc:  # noqa: BLE001 - pymatgen raises IndexError, ZeroDivisionError... for bad files
        raise RecordError(f"not a readable structure file (CIF, POSCAR/CONTCAR/*.vasp, extxyz, pymatgen JSON): "
                          f"{_words(exc)}") from None


def read_candidate_files(paths: Iterable[str | Path]) -> ImportResult:
    """CANDIDATES_SCHEMA rows of every structure in ``paths`` (files or folders, dotfiles included); each file
    or structure that cannot be read becomes a reject naming the file (and the structure's index), the rest are
    kept."""
    result = ImportResult(SOURCE_FILE)
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(sorted(q for q in p.rglob("*") if q.is_file()))
        elif p.is_file():
            files.append(p)
        else:
            result.reject(str(p), RecordError("no such file or folder"))
    seen: set[str] = set()
    for path in files:
        try:
            structures = _structures_in_file(path)
            if not structures:
                raise RecordError("no structure in file")
        except Exception as exc:  # noqa: BLE001 - every unreadable file is reported and skipped
            result.reject(str(path), exc if isinstance(exc, RecordError) else RecordError(_words(exc)))
            continue
        for i, (fid, structure) in enumerate(structures):
            cid = fid or (path.name if len(structures) == 1 else f"{path.name}:{i}")
            origin = str(path) if len(structures) == 1 else f"{path}:{i}"
            try:
                if isinstance(structure, Exception):
                    raise structure
                if cid in seen:
                    raise RecordError(f"duplicate candidate_id {cid!r}")
                result.rows.append(candidate_row(cid, structure, source=SOURCE_FILE, origin=origin))
                seen.add(cid)
            except Exception as exc:  # noqa: BLE001
                result.reject(origin, exc if isinstance(exc, RecordError) else RecordError(_words(exc)))
    return result


# ----------------------------------------------------------------------------------- prototype substitution

def _by_electronegativity(symbols: Iterable[str]) -> list[str]:
    return sorted(symbols, key=lambda s: (Element(s).X, s))


def element_mappings(prototype: Sequence[str], target: Sequence[str], mode: str = "electronegativity") -> list[dict]:
    """Assignments prototype element -> target element (same count), as dicts."""
    if len(prototype) != len(target):
        return []
    if mode == "electronegativity":
        return [dict(zip(_by_electronegativity(prototype), _by_electronegativity(target), strict=True))]
    if mode == "all":
        src = sorted(prototype)
        return [dict(zip(src, perm, strict=True)) for perm in itertools.permutations(sorted(target))]
    raise ValueError(f"unknown mapping mode {mode!r}; use 'electronegativity' or 'all'")


def _prototype_structures(prototypes: pa.Table | Iterable[Any]) -> list[tuple[str, Structure]]:
    """(id, structure) of entries, (id, Structure) pairs or an ENTRIES_SCHEMA table, sorted by id."""
    items = [row_to_entry(r) for r in prototypes.to_pylist()] if isinstance(prototypes, pa.Table) else prototypes
    out: dict[str, Structure] = {}
    for item in items:
        if isinstance(item, tuple):
            pid, structure = item
        elif hasattr(item, "structure"):
            pid, structure = item.entry_id, item.structure
        else:
            continue  # ComputedEntry without structure: nothing to substitute
        out.setdefault(str(pid), structure)
    return sorted(out.items())


def substitute_prototypes(
    prototypes: pa.Table | Iterable[Any],
    target_chemsys: str | Iterable[str],
    *,
    max_candidates: int | None = None,
    seed: int = 0,
    mode: str = "electronegativity",
    known: Iterable[Structure] = (),
    target_formulas: Iterable[str] | None = None,
    matcher: StructureMatcher | None = None,
) -> ImportResult:
    """Candidates made by substituting the target's elements into prototypes of other chemical systems.

    Prototypes must have exactly as many elements as the target (their chemical system differs from it).
    ``target_formulas`` (e.g. ``["LiNiO2"]``) keeps only prototypes with the same anonymous formula whose
    substitution gives one of these compositions.
    Results matching each other or any ``known`` structure (StructureMatcher) are dropped; with
    ``max_candidates``, the substituted structures are visited in an order shuffled with ``seed`` and the first
    ``max_candidates`` unique ones are kept (same seed, same candidates).
    """
    target = chemsys_elements(target_chemsys)
    wanted = None if target_formulas is None else {Composition(f).reduced_formula for f in target_formulas}
    wanted_anonymous = None if wanted is None else {Composition(f).anonymized_formula for f in wanted}
    matcher = matcher or StructureMatcher()
    result = ImportResult(SOURCE_SUBSTITUTION)
    made: list[tuple[str, str, dict, Structure]] = []
    for pid, proto in _prototype_structures(prototypes):
        elements = sorted(el.symbol for el in proto.composition.elements)
        if elements == target:
            continue  # same system: a known material, not a prototype
        if wanted_anonymous is not None and proto.composition.anonymized_formula not in wanted_anonymous:
            continue
        for mapping in element_mappings(elements, target, mode):
            if wanted is not None and _substituted_formula(proto, mapping) not in wanted:
                continue
            sub = {a: b for a, b in mapping.items() if a != b}
            cid = f"{pid}:" + ",".join(f"{a}>{b}" for a, b in sorted(sub.items()))
            try:
                new = proto.copy()  # drop site properties: the prototype's magmoms belong to other species
                for name in list(new.site_properties):
                    new.remove_site_property(name)
                new.replace_species(mapping)
                check_structure(new, cid)
                made.append((cid, pid, mapping, new))
            except Exception as exc:  # noqa: BLE001 - a failed substitution is a reject, the rest carry on
                result.reject(cid, exc)
    unique = select_unique(made, list(known), matcher, max_candidates=max_candidates, seed=seed)
    for cid, pid, mapping, structure in unique:
        result.rows.append(candidate_row(cid, structure, source=SOURCE_SUBSTITUTION, origin=pid,
                                         substitution=mapping, meta={"mode": mode, "seed": seed}))
    return result


def _substituted_formula(structure: Structure, mapping: Mapping[str, str]) -> str:
    comp = structure.composition
    return Composition({mapping[el.symbol]: amt for el, amt in comp.items()}).reduced_formula


def select_unique(
    made: list[tuple], known: list[Structure], matcher: StructureMatcher, *, max_candidates: int | None, seed: int
) -> list[tuple]:
    """Up to ``max_candidates`` items whose structures (last tuple field) match neither each other nor ``known``.

    Items are visited in an order shuffled with ``seed`` (input order when there is no cap), so a small cap
    costs few StructureMatcher comparisons; comparisons are only made within one reduced formula.
    """
    order = list(range(len(made)))
    if max_candidates is None:  # no cap: pymatgen's grouping (faster than pairwise fits) picks the candidates
        order = _group_representatives(made, matcher)
    else:
        random.Random(seed).shuffle(order)
    known_by_formula: dict[str, list[Structure]] = {}
    for s in known:
        known_by_formula.setdefault(s.composition.reduced_formula, []).append(s)
    accepted: dict[str, list[Structure]] = {}
    keep: list[int] = []
    for i in order:
        if max_candidates is not None and len(keep) >= max_candidates:
            break
        s = made[i][-1]
        formula = s.composition.reduced_formula
        # grouped representatives (no cap) are already distinct from each other: compare with known only
        others = known_by_formula.get(formula, []) + (accepted.get(formula, []) if max_candidates is not None else [])
        if not any(matcher.fit(s, other) for other in others):
            accepted.setdefault(formula, []).append(s)
            keep.append(i)
    return [made[i] for i in sorted(keep)]


def _group_representatives(made: list[tuple], matcher: StructureMatcher) -> list[int]:
    """Index of the first item of each StructureMatcher group (one group_structures call per formula)."""
    by_formula: dict[str, list[int]] = {}
    for i, item in enumerate(made):
        by_formula.setdefault(item[-1].composition.reduced_formula, []).append(i)
    firsts: list[int] = []
    for idx in by_formula.values():
        position = {id(made[i][-1]): i for i in idx}
        firsts.extend(position[id(group[0])] for group in matcher.group_structures([made[i][-1] for i in idx]))
    return sorted(firsts)
