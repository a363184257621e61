"""Thermo types: which entries enter a hull and which energy corrections they carry (all done by pymatgen).

=====================  ==========  ===============================================================================
thermo type            fidelity    entries and energies
=====================  ==========  ===============================================================================
``R2SCAN``             r2scan      r2SCAN entries, uncorrected energies (as MP's R2SCAN thermo type)
``GGA_GGA+U``          pbe         GGA/GGA+U entries with MaterialsProject2020Compatibility corrections
``GGA_GGA+U_R2SCAN``   pbe         GGA/GGA+U + r2SCAN entries through MaterialsProjectDFTMixingScheme (GGA scale)
``raw``                any         entries of one named fidelity (e.g. ``gpaw-pbe``), uncorrected energies
=====================  ==========  ===============================================================================

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

import pyarrow as pa
from pymatgen.analysis.compatibility import MaterialsProject2020Compatibility
from pymatgen.analysis.compatibility.mixing_scheme import MaterialsProjectDFTMixingScheme
from pymatgen.core import Composition
from pymatgen.core.entries import ComputedEntry, ComputedStructureEntry

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


@dataclass
class ThermoEntries:
    """Entries of one thermo type, energies ready for a phase diagram, and the entries that were refused."""

    thermo_type: str
    fidelity: str
    entries: list[ComputedEntry]
    rejects: list[dict[str, str]] = field(default_factory=list)


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
    scheme = MaterialsProjectDFTMixingScheme(compat_1=mp2020(check_potcar), check_potcar=check_potcar)
    for e in picked:
        if not isinstance(e, ComputedStructureEntry):
            raise ThermoError(f"{e.entry_id}: the mixing scheme needs structures (ComputedStructureEntry)")
    with pymatgen_warnings_to_log(f"mixing scheme on {len(picked)} entries"):
        processed = scheme.process_entries(picked, clean=True, inplace=False)
    rejects = _reject_missing(picked, processed, "discarded by MaterialsProjectDFTMixingScheme")
    return ThermoEntries(thermo_type, target, list(processed), unknown + rejects)


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

    ``R2SCAN`` / ``raw``: no correction. ``GGA_GGA+U`` and ``GGA_GGA+U_R2SCAN`` (whose hull is on the GGA scale,
    where new GGA(+U) materials take their MP2020 energies): MP2020 corrections, with MP's U values when the entry
    has no run type or no ``hubbards`` (a prediction trained on MP data is on MP's U scale). Raises RecordError
    when pymatgen refuses the entry.
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
