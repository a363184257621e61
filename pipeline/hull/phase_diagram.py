"""Reference convex hulls: pymatgen phase diagrams of one thermo type, per chemical system.

A :class:`ReferenceHull` holds the corrected entries, the pymatgen ``PhaseDiagram`` (or ``PatchedPhaseDiagram``
for entry sets spanning many elements) and the entries refused on the way. All hull geometry is pymatgen's.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import pyarrow as pa
from pymatgen.analysis.phase_diagram import PatchedPhaseDiagram, PhaseDiagram
from pymatgen.core.entries import ComputedEntry

from pipeline.frames import RecordError
from pipeline.hull.thermo import EntrySource, MixingState, ThermoEntries, thermo_entries

#: Above this many elements in one entry set, ``patched="auto"`` builds a PatchedPhaseDiagram.
PATCHED_MIN_ELEMENTS = 6


def chemsys_elements(chemsys: str | Iterable[str]) -> list[str]:
    """'Li-Ni-O' or ['O', 'Li', 'Ni'] -> sorted element symbols."""
    parts = chemsys.split("-") if isinstance(chemsys, str) else list(chemsys)
    return sorted({p.strip() for p in parts if p.strip()})


def chemsys_of(entry: ComputedEntry) -> str:
    """Sorted element symbols of an entry joined by '-'."""
    return entry.composition.chemical_system


def decomposition_json(decomp: dict) -> str:
    """{entry: fraction} -> JSON {entry_id or formula: fraction} (stable order)."""
    out = {str(e.entry_id or e.composition.reduced_formula): round(float(x), 10) for e, x in decomp.items()}
    return json.dumps(dict(sorted(out.items())))


@dataclass
class ReferenceHull:
    """Phase diagram of one thermo type and fidelity over a set of elements."""

    thermo_type: str
    fidelity: str
    entries: list[ComputedEntry]
    diagram: PhaseDiagram
    rejects: list[dict[str, str]] = field(default_factory=list)
    mixing: MixingState | None = None  # GGA_GGA+U_R2SCAN: what pymatgen's mixing scheme decided

    @property
    def scale(self) -> str:
        """Fidelity of the hull's energy scale (for GGA_GGA+U_R2SCAN: 'r2scan' or 'pbe', as pymatgen mixed it)."""
        return self.mixing.scale if self.mixing is not None else self.fidelity

    @property
    def elements(self) -> list[str]:
        return sorted(el.symbol for el in self.diagram.elements)

    @property
    def chemsys(self) -> str:
        return "-".join(self.elements)

    def stable_entry_ids(self) -> set[str]:
        return {str(e.entry_id) for e in self.diagram.stable_entries}

    def covers(self, entry: ComputedEntry) -> bool:
        """True when every element of ``entry`` is in this hull."""
        return {el.symbol for el in entry.composition.elements} <= set(self.elements)

    def decomposition_and_e_above_hull(self, entry: ComputedEntry) -> tuple[dict, float]:
        """(decomposition {entry: fraction}, E_hull in eV/atom); negative E_hull = below the hull."""
        if not self.covers(entry):
            missing = sorted({el.symbol for el in entry.composition.elements} - set(self.elements))
            raise RecordError(f"{entry.entry_id}: elements {missing} are not in the {self.chemsys} hull")
        decomp, e_hull = self.diagram.get_decomp_and_e_above_hull(entry, allow_negative=True, check_stable=False)
        return decomp, float(e_hull)

    def e_above_hull_table(self) -> pa.Table:
        """One row per reference entry: id, formula, energy per atom, formation energy, ``e_hull`` (eV/atom, the
        report tables' e_hull_* naming), stability."""
        rows = []
        stable = self.stable_entry_ids()
        for e in self.entries:
            decomp, e_hull = self.diagram.get_decomp_and_e_above_hull(e, allow_negative=True)
            rows.append({
                "entry_id": str(e.entry_id),
                "formula": e.composition.reduced_formula,
                "chemsys": chemsys_of(e),
                "energy_per_atom": float(e.energy_per_atom),
                "formation_energy_per_atom": float(self.diagram.get_form_energy_per_atom(e)),
                "e_hull": e_hull,
                "is_stable": str(e.entry_id) in stable,
                "decomposition": decomposition_json(decomp),
            })
        return pa.Table.from_pylist(rows)


def phase_diagram(entries: Sequence[ComputedEntry], patched: bool | str = "auto") -> PhaseDiagram:
    """pymatgen PhaseDiagram, or PatchedPhaseDiagram when ``patched`` (``"auto"``: many elements)."""
    n_el = len({el for e in entries for el in e.composition.elements})
    use_patched = n_el >= PATCHED_MIN_ELEMENTS if patched == "auto" else bool(patched)
    return PatchedPhaseDiagram(entries) if use_patched else PhaseDiagram(entries)


def build_reference_hull(
    source: EntrySource | ThermoEntries,
    thermo_type: str | None = None,
    *,
    chemsys: str | Iterable[str] | None = None,
    fidelity: str | None = None,
    patched: bool | str = "auto",
    check_potcar: bool = False,
) -> ReferenceHull:
    """Reference hull of ``thermo_type`` from entries (ENTRIES_SCHEMA table or pymatgen entries).

    ``chemsys`` restricts to one chemical system and its subsystems (corrections such as the mixing scheme are
    then applied within that system, as MP does). Pass already-built :class:`ThermoEntries` to skip corrections.
    """
    elements = None if chemsys is None else chemsys_elements(chemsys)
    if isinstance(source, ThermoEntries):
        te = source
        if elements is not None:
            keep = set(elements)
            te = ThermoEntries(te.thermo_type, te.fidelity,
                               [e for e in te.entries if {x.symbol for x in e.composition.elements} <= keep],
                               list(te.rejects), te.mixing)
    else:
        if thermo_type is None:
            raise ValueError("thermo_type is required unless ThermoEntries are given")
        te = thermo_entries(source, thermo_type, fidelity=fidelity, elements=elements, check_potcar=check_potcar)
    try:
        diagram = phase_diagram(te.entries, patched)
    except ValueError as exc:  # pymatgen: missing terminal (elemental) entries, empty set
        raise RecordError(f"cannot build the {te.thermo_type} hull of {chemsys or 'the entry set'}: {exc}") from exc
    have = sorted(el.symbol for el in diagram.elements)
    if elements is not None and have != elements:
        raise RecordError(f"cannot build the {te.thermo_type} hull of {'-'.join(elements)}: entries only span "
                          f"{'-'.join(have)} (no entries with {sorted(set(elements) - set(have))})")
    return ReferenceHull(te.thermo_type, te.fidelity, te.entries, diagram, list(te.rejects), te.mixing)


def build_reference_hulls(
    source: EntrySource,
    thermo_type: str,
    chemsystems: Iterable[str | Iterable[str]],
    **kwargs,
) -> dict[str, ReferenceHull | RecordError]:
    """One reference hull per chemical system; a system that fails maps to its error, the rest carry on."""
    if isinstance(source, pa.Table):
        source_entries: EntrySource = source
    else:
        source_entries = list(source)
    out: dict[str, ReferenceHull | RecordError] = {}
    for cs in chemsystems:
        key = "-".join(chemsys_elements(cs))
        try:
            out[key] = build_reference_hull(source_entries, thermo_type, chemsys=key, **kwargs)
        except (RecordError, ValueError) as exc:
            out[key] = exc if isinstance(exc, RecordError) else RecordError(f"{key}: {exc}")
    return out
