"""Thermo types: which entries enter a hull and which energy corrections they carry (all done by pymatgen).

=====================  ==========  ===============================================================================
thermo type            fidelity    entries and energies
=====================  ==========  ===============================================================================
``R2SCAN``             r2scan      r2SCAN entries, uncorrected energies (as MP's R2SCAN thermo type)
``GGA_GGA+U``          pbe         GGA/GGA+U entries with MaterialsProject2020Compatibility corrections
``GGA_GGA+U_R2SCAN``   pbe         GGA/GGA+U + r2SCAN entries through MaterialsProjectDFTMixingScheme: on the r2SCAN
                                  scale when every GGA ground state has an r2SCAN entry, else on the GGA scale
``raw``                any         entries of one named fidelity (e.g. ``gpaw-pbe``), uncorrected energies
=====================  ==========  ===============================================================================

Predictions are placed on the mixed hull's scale by :func:`place_on_mixed_scale` (see there), from the
:class:`MixingState` pymatgen computed for the reference entries.

Entries without POTCAR information (the .res dumps, the project's GPAW data) need ``check_potcar=False``.
Entries pymatgen refuses (wrong U, unknown run type, no GGA ground state for the mixing scheme...) are returned as
rejects with the reason, never dropped silently.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import pandas as pd
import pyarrow as pa
from pymatgen.analysis.compatibility import MaterialsProject2020Compatibility
from pymatgen.analysis.compatibility.mixing_scheme import MaterialsProjectDFTMixingScheme
from pymatgen.analysis.phase_diagram import PhaseDiagram
from pymatgen.core import Composition
from pymatgen.core.entries import ComputedEntry, ComputedStructureEntry, ConstantEnergyAdjustment

from pipeline.entries import fidelity_from_run_type, normalize_run_type, row_to_entry
from pipeline.frames import RecordError

log = logging.getLogger(__name__)

R2SCAN = "R2SCAN"
GGA_GGA_U = "GGA_GGA+U"
GGA_GGA_U_R2SCAN = "GGA_GGA+U_R2SCAN"
RAW = "raw"
THERMO_TYPES = (R2SCAN, GGA_GGA_U, GGA_GGA_U_R2SCAN, RAW)

#: Fidelity of the energy scale of each MP thermo type (``raw`` takes the fidelity it is given).
THERMO_FIDELITY = {R2SCAN: "r2scan", GGA_GGA_U: "pbe", GGA_GGA_U_R2SCAN: "pbe"}
#: Fidelities whose entries a thermo type reads.
_INPUT_FIDELITIES = {R2SCAN: ("r2scan",), GGA_GGA_U: ("pbe",), GGA_GGA_U_R2SCAN: ("pbe", "r2scan")}


class ThermoError(ValueError):
    """A thermo type cannot be applied (unknown type, missing fidelity, no entries)."""


MIXING_ADJUSTMENT = "MP GGA(+U)/R2SCAN mixing adjustment"


@dataclass
class MixingState:
    """What pymatgen's ``MaterialsProjectDFTMixingScheme`` decided for one set of reference entries.

    ``table`` is pymatgen's own mixing-state DataFrame (one row per material: GGA and r2SCAN entry ids, energies
    per atom, ``is_stable_1`` = GGA ground state, hull energies at the composition); ``gga`` / ``r2scan`` are the
    phase diagrams of the MP2020-corrected GGA(+U) and the raw r2SCAN entries the scheme reads (``r2scan`` is None
    when those entries do not span the system); ``inputs`` are the raw entries given to the scheme.
    """

    table: pd.DataFrame
    gga: PhaseDiagram
    r2scan: PhaseDiagram | None
    inputs: list[ComputedStructureEntry]

    @property
    def r2scan_scale(self) -> bool:
        """True when every GGA ground state has an r2SCAN entry: the mixed hull is then on the r2SCAN scale."""
        stable = self.table[self.table["is_stable_1"].astype(bool)]
        return bool(stable["entry_id_2"].notna().all())

    @property
    def scale(self) -> str:
        """Fidelity of the mixed hull's energy scale: 'r2scan' or 'pbe'."""
        return "r2scan" if self.r2scan_scale else "pbe"

    def r2scan_of_gga_ground_state(self, composition: Composition) -> float | None:
        """r2SCAN energy per atom of the GGA ground state at this composition, when the scheme matched one."""
        rows = self.table[(self.table["formula"] == composition.reduced_formula)
                          & self.table["is_stable_1"].astype(bool) & self.table["entry_id_2"].notna()]
        return None if rows.empty else float(rows["energy_2"].iloc[0])

    def pairs(self) -> list[tuple[str | None, str | None]]:
        """(GGA entry id, r2SCAN entry id) of every material in the state (None where a run type is missing)."""
        return [(None if pd.isna(a) else str(a), None if pd.isna(b) else str(b))
                for a, b in zip(self.table["entry_id_1"], self.table["entry_id_2"], strict=True)]


@dataclass
class ThermoEntries:
    """Entries of one thermo type, energies ready for a phase diagram, and the entries that were refused."""

    thermo_type: str
    fidelity: str
    entries: list[ComputedEntry]
    rejects: list[dict[str, str]] = field(default_factory=list)
    mixing: MixingState | None = None  # GGA_GGA+U_R2SCAN only


EntrySource = pa.Table | Iterable[ComputedEntry]


def check_thermo_type(thermo_type: str, fidelity: str | None = None) -> str:
    """Validate a thermo type (and its fidelity); return the fidelity of its energy scale."""
    if thermo_type not in THERMO_TYPES:
        raise ThermoError(f"unknown thermo type {thermo_type!r}; known: {THERMO_TYPES}")
    if thermo_type == RAW:
        if not fidelity:
            raise ThermoError("thermo type 'raw' needs a fidelity (e.g. 'gpaw-pbe')")
        return fidelity.lower()
    expected = THERMO_FIDELITY[thermo_type]
    if fidelity is not None and fidelity.lower() != expected:
        raise ThermoError(f"thermo type {thermo_type} is on the {expected!r} scale, not {fidelity!r}")
    return expected


def entry_fidelity(entry: ComputedEntry) -> str:
    """Fidelity of a pymatgen entry: ``data['fidelity']`` if set, else from its MP run type."""
    fid = (entry.data or {}).get("fidelity")
    if fid:
        return str(fid).lower()
    return fidelity_from_run_type((entry.parameters or {}).get("run_type"))


def entries_with_fidelity(source: EntrySource) -> tuple[list[tuple[ComputedEntry, str]], list[dict[str, str]]]:
    """(entry, fidelity) pairs from an ENTRIES_SCHEMA table (its ``fidelity`` column) or pymatgen entries, and
    rejects for entries whose fidelity is unknown.

    A table may hold one entry under several thermo types (key: entry_id + thermo_type); the first row of each
    entry_id is used, since corrections are recomputed here from the raw energy.
    """
    pairs: list[tuple[ComputedEntry, str]] = []
    rejects: list[dict[str, str]] = []
    if isinstance(source, pa.Table):
        seen: set[str] = set()
        for r in source.to_pylist():
            if r["entry_id"] not in seen:
                seen.add(r["entry_id"])
                pairs.append((row_to_entry(r), str(r["fidelity"]).lower()))
        return pairs, rejects
    for e in source:
        try:
            pairs.append((e, entry_fidelity(e)))
        except RecordError as exc:
            rejects.append({"entry_id": str(e.entry_id), "error": f"unknown fidelity: {exc}"})
    return pairs, rejects


def within(entry: ComputedEntry, elements: set[str] | None) -> bool:
    """True when all elements of the entry are in ``elements`` (or no restriction)."""
    return elements is None or {el.symbol for el in entry.composition.elements} <= elements


def uncorrected(entry: ComputedEntry) -> ComputedEntry:
    """A copy of the entry with every energy adjustment removed (raw energy)."""
    out = copy.deepcopy(entry)
    out.energy_adjustments = []
    return out


def _missing(before: Sequence[ComputedEntry], after: Sequence[ComputedEntry]) -> list[ComputedEntry]:
    kept = {e.entry_id for e in after}
    return [e for e in before if e.entry_id not in kept]


def _reject_missing(before: Sequence[ComputedEntry], after: Sequence[ComputedEntry], why: str) -> list[dict]:
    return [{"entry_id": str(e.entry_id), "error": why} for e in _missing(before, after)]


def _mp2020_reason(compat: MaterialsProject2020Compatibility, entry: ComputedEntry) -> str:
    try:
        compat.process_entry(copy.deepcopy(entry), clean=True, on_error="raise")
    except Exception as exc:  # noqa: BLE001 - only to report pymatgen's reason
        reason = str(exc).split(" for {")[0][:300]  # pymatgen appends the whole entry dict
        return f"MaterialsProject2020Compatibility: {type(exc).__name__}: {reason}"
    return "refused by MaterialsProject2020Compatibility"


@contextlib.contextmanager
def pymatgen_warnings_to_log(what: str) -> Iterator[None]:
    """Collect the warnings pymatgen raises per entry (e.g. failed oxidation-state guesses) into one log line."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    if caught:
        counts = Counter(str(w.message).split(" for Entry")[0].split(" for ")[0][:120] for w in caught)
        log.info("%s: %d pymatgen warnings: %s", what, len(caught), dict(counts.most_common(3)))


def mp2020(check_potcar: bool = False) -> MaterialsProject2020Compatibility:
    """A fresh MP2020 compatibility (never pymatgen's shared default instance)."""
    return MaterialsProject2020Compatibility(check_potcar=check_potcar)


def thermo_entries(
    source: EntrySource,
    thermo_type: str,
    *,
    fidelity: str | None = None,
    elements: Iterable[str] | None = None,
    check_potcar: bool = False,
) -> ThermoEntries:
    """Select and correct the entries of ``source`` for ``thermo_type``.

    ``elements`` restricts to entries whose elements are a subset (one chemical system and its subsystems).
    Input entries are never modified.
    """
    target = check_thermo_type(thermo_type, fidelity)
    wanted = _INPUT_FIDELITIES.get(thermo_type, (target,))
    els = None if elements is None else {str(e) for e in elements}
    pairs, unknown = entries_with_fidelity(source)
    picked = [copy.deepcopy(e) for e, fid in pairs if fid in wanted and within(e, els)]
    if not picked:
        raise ThermoError(f"no entries of fidelity {wanted} for thermo type {thermo_type}"
                          + (f" in {'-'.join(sorted(els))}" if els else ""))
    if thermo_type in (R2SCAN, RAW):
        return ThermoEntries(thermo_type, target, [uncorrected(e) for e in picked], unknown)
    if thermo_type == GGA_GGA_U:
        compat = mp2020(check_potcar)
        with pymatgen_warnings_to_log(f"MP2020 on {len(picked)} entries"):
            processed = compat.process_entries(picked, clean=True, inplace=False, on_error="ignore")
        rejects = [{"entry_id": str(e.entry_id), "error": _mp2020_reason(compat, e)} for e in _missing(picked, processed)]
        return ThermoEntries(thermo_type, target, list(processed), unknown + rejects)
    processed, state = mix(picked, check_potcar=check_potcar)
    rejects = _reject_missing(picked, processed, "discarded by MaterialsProjectDFTMixingScheme")
    return ThermoEntries(thermo_type, target, processed, unknown + rejects, state)


def mix(entries: Sequence[ComputedEntry], *, check_potcar: bool = False) -> tuple[list[ComputedEntry], MixingState]:
    """Raw GGA(+U) and r2SCAN entries through pymatgen's ``MaterialsProjectDFTMixingScheme`` (MP2020 on the GGA
    side), as MP's thermo builder does; returns the processed entries and the :class:`MixingState`.

    The mixing-state table is computed once with pymatgen's public ``get_mixing_state_data`` (from the same
    MP2020-corrected GGA and raw r2SCAN entries the scheme would build itself) and handed to ``process_entries``.
    """
    for e in entries:
        if not isinstance(e, ComputedStructureEntry):
            raise ThermoError(f"{e.entry_id}: the mixing scheme needs structures (ComputedStructureEntry)")
    inputs = [uncorrected(e) for e in entries]
    compat = mp2020(check_potcar)
    scheme = MaterialsProjectDFTMixingScheme(compat_1=compat, check_potcar=check_potcar)
    gga_raw = [e for e in inputs if normalize_run_type((e.parameters or {}).get("run_type")) in ("GGA", "GGA+U")]
    r2scan = [e for e in inputs if normalize_run_type((e.parameters or {}).get("run_type")) == "R2SCAN"]
    with pymatgen_warnings_to_log(f"mixing scheme on {len(inputs)} entries"):
        gga = compat.process_entries(copy.deepcopy(gga_raw), clean=True, inplace=False, on_error="ignore")
        if not gga:
            raise ThermoError("the mixing scheme needs GGA/GGA+U entries; none passed MP2020")
        table = scheme.get_mixing_state_data(list(gga) + copy.deepcopy(r2scan))
        processed = scheme.process_entries(inputs, clean=True, inplace=False, mixing_state_data=table)
    gga_pd = PhaseDiagram(gga)
    try:
        r2_pd = PhaseDiagram(r2scan) if r2scan else None
    except ValueError:  # r2SCAN entries do not span the system (then the hull is on the GGA scale)
        r2_pd = None
    if r2_pd is not None and set(r2_pd.elements) != set(gga_pd.elements):
        r2_pd = None
    return list(processed), MixingState(table, gga_pd, r2_pd, inputs)


def _with_mixing(entry: ComputedEntry, shift_per_atom: float, why: str) -> ComputedEntry:
    out = copy.deepcopy(entry)
    if shift_per_atom:
        out.energy_adjustments = [*out.energy_adjustments, ConstantEnergyAdjustment(
            shift_per_atom * out.composition.num_atoms, 0.0, name=MIXING_ADJUSTMENT, description=why)]
    return out


def place_on_mixed_scale(
    state: MixingState, pbe: ComputedEntry | None = None, r2scan: ComputedEntry | None = None,
) -> ComputedEntry:
    """The energy a new material gets on a GGA_GGA+U_R2SCAN hull, from its (MP2020-corrected) PBE and/or (raw)
    r2SCAN energy: the adjustments of pymatgen's ``MaterialsProjectDFTMixingScheme.get_adjustments`` for a
    material that joins the reference set, read against the reference ``state``.

    Written here because pymatgen's scheme only adjusts entries that are part of its own mixing state: passing a
    candidate through ``process_entries`` with the references lets the candidate change the references' state,
    and a candidate whose structure matches a reference material is dropped as a duplicate.

    r2SCAN scale (every GGA ground state has an r2SCAN entry): the r2SCAN energy as is; a PBE-only energy is
    shifted by (r2SCAN hull - GGA hull) at its composition (same E_hull as on the GGA hull).
    GGA scale: with both energies, the r2SCAN energy is placed relative to the GGA ground state of its
    composition when that has an r2SCAN energy (E = GGA hull + E_r2SCAN - E_r2SCAN(ground state)), unless the
    material would itself be the new GGA ground state; otherwise the PBE energy is used, as is.
    Raises ThermoError when neither energy can be placed (r2SCAN only, no matched GGA ground state).
    """
    if pbe is None and r2scan is None:
        raise ThermoError("give a PBE or an r2SCAN energy to place on the mixed hull")
    comp = (pbe or r2scan).composition
    if pbe is not None and r2scan is not None and pbe.composition.reduced_composition != r2scan.composition.reduced_composition:
        raise ThermoError(f"PBE ({pbe.composition.reduced_formula}) and r2SCAN ({r2scan.composition.reduced_formula}) "
                          "energies of different compositions")
    h1 = float(state.gga.get_hull_energy_per_atom(comp))
    if state.r2scan_scale:
        if r2scan is not None:
            return uncorrected(r2scan)
        if state.r2scan is None:
            raise ThermoError("mixed hull on the r2SCAN scale without an r2SCAN phase diagram")
        h2 = float(state.r2scan.get_hull_energy_per_atom(comp))
        return _with_mixing(pbe, h2 - h1, "Place GGA energy onto the R2SCAN hull")
    gs2 = state.r2scan_of_gga_ground_state(comp)
    if r2scan is not None and gs2 is not None and (pbe is None or pbe.energy_per_atom >= h1):
        e2 = r2scan.energy_per_atom
        return _with_mixing(uncorrected(r2scan), h1 + (e2 - gs2) - e2, "Place R2SCAN energy onto the GGA hull")
    if pbe is None:
        raise ThermoError(f"{r2scan.entry_id}: no GGA ground state of {comp.reduced_formula} with an r2SCAN energy "
                          "and no PBE energy: the mixing scheme cannot place an r2SCAN-only energy here")
    return copy.deepcopy(pbe)


def mp2020_parameters(composition: Composition, compat: MaterialsProject2020Compatibility) -> dict:
    """MP run parameters a GGA(+U) calculation of ``composition`` would have had (MP's U values).

    MP applies U only in oxides and fluorides, with the values of its input set (read from pymatgen's
    compatibility, which uses the same table): the most electronegative element picks the set.
    """
    most_electroneg = max(composition.elements, key=lambda el: el.X).symbol
    u_table = compat.u_settings.get(most_electroneg, {})
    hubbards = {el.symbol: float(u_table[el.symbol]) for el in composition.elements if el.symbol in u_table}
    return {"run_type": "GGA+U" if hubbards else "GGA", "is_hubbard": bool(hubbards), "hubbards": hubbards}


def correct_like_reference(entry: ComputedEntry, thermo_type: str, *, check_potcar: bool = False) -> ComputedEntry:
    """Put a predicted raw energy on the energy scale of a reference hull of ``thermo_type``.

    ``R2SCAN`` / ``raw``: no correction. ``GGA_GGA+U``: MP2020 corrections, with MP's U values when the entry
    has no run type or no ``hubbards`` (a prediction trained on MP data is on MP's U scale). ``GGA_GGA+U_R2SCAN``:
    the same MP2020 step only (the PBE side of the mixing scheme); :func:`place_on_mixed_scale` then puts it on the
    mixed hull's scale. Raises RecordError when pymatgen refuses the entry.
    """
    if thermo_type not in THERMO_TYPES:
        raise ThermoError(f"unknown thermo type {thermo_type!r}; known: {THERMO_TYPES}")
    if thermo_type in (R2SCAN, RAW):
        return uncorrected(entry)
    compat = mp2020(check_potcar)
    out = copy.deepcopy(entry)
    params = dict(out.parameters or {})
    if normalize_run_type(params.get("run_type")) not in ("GGA", "GGA+U") or "hubbards" not in params:
        params.update(mp2020_parameters(out.composition, compat))
    out.parameters = params
    try:
        processed = compat.process_entry(out, clean=True, on_error="raise")
    except Exception as exc:  # CompatibilityError and pymatgen's oxidation-state errors
        raise RecordError(f"{entry.entry_id}: MP2020 correction failed: {exc}") from exc
    if processed is None:
        raise RecordError(f"{entry.entry_id}: MP2020 refused the entry")
    return processed
