"""Candidate pools for active learning, and oracles that label them at the expensive fidelity.

A :class:`Pool` is what a screening campaign starts from: candidate structures (id, structure at which the model
predicts) plus the cheap-fidelity frames everybody has (e.g. MP's GGA/GGA+U relaxations), which the models are
trained on. The expensive labels come only through an :class:`Oracle`:

* :class:`LookupOracle` returns labels computed beforehand (a benchmark that must never rerun DFT);
* :class:`LabellerOracle` runs any ASE calculator through :class:`pipeline.label.LabelStore` (GPAW, VASP, EMT
  in the tests), appending frames and entries with provenance, idempotent by structure hash.

:func:`load_res_pool` builds the real-data pool used by ``benchmarks/active_learning.py``: the Materials Project
Li-Ni-O system as ``.res`` files (``../shared/data/mp/mp-res_Li-Ni-O/Li-Ni-O.res.tar``, read in place), whose 51
r2SCAN materials all have a GGA/GGA+U calculation too.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa
from pymatgen.core import Composition, Structure

from pipeline.frames import RecordError, frame_row, frames_table


@dataclass(frozen=True)
class Candidate:
    """One pool member: the structure the model predicts at, and its cheap-fidelity label if known."""

    candidate_id: str
    structure: Structure
    low_energy: float | None = None  # total energy (eV) of ``structure`` at the pool's low fidelity (its scale)

    @property
    def composition(self) -> Composition:
        return self.structure.composition

    @property
    def nsites(self) -> int:
        return len(self.structure)


@dataclass
class Pool:
    """Candidates + low-fidelity training frames (FRAMES_SCHEMA rows) + the fidelity names."""

    candidates: list[Candidate]
    low_frames: pa.Table
    low: str = "pbe"
    high: str = "r2scan"
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        ids = [c.candidate_id for c in self.candidates]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ValueError(f"pool: duplicate candidate ids {dup[:5]}")
        if not self.candidates:
            raise ValueError("pool: no candidates")

    def ids(self) -> list[str]:
        return [c.candidate_id for c in self.candidates]

    def by_id(self) -> dict[str, Candidate]:
        return {c.candidate_id: c for c in self.candidates}

    def elements(self) -> list[str]:
        return sorted({el.symbol for c in self.candidates for el in c.composition.elements})

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "n_candidates": len(self.candidates), "n_low_frames": self.low_frames.num_rows,
                "low": self.low, "high": self.high, "elements": self.elements(), **self.meta}


@dataclass(frozen=True)
class Label:
    """A high-fidelity label of one candidate: the (relaxed) structure it belongs to and its raw energy."""

    candidate_id: str
    structure: Structure
    energy: float  # raw total energy (eV) of ``structure``
    meta: Mapping[str, Any] = field(default_factory=dict)

    @property
    def energy_per_atom(self) -> float:
        return self.energy / len(self.structure)


class Oracle(Protocol):
    """Labels candidates at the expensive fidelity; failures are returned, never raised, per item."""

    fidelity: str

    def label(self, candidates: Sequence[Candidate]) -> tuple[list[Label], dict[str, str]]:
        """Labels of the candidates that worked, and {candidate_id: one-line error} for those that did not."""
        ...


class LookupOracle:
    """Labels looked up in a table computed beforehand (no calculation; a missing id is a failed item)."""

    def __init__(self, labels: Mapping[str, Label], fidelity: str = "r2scan", source: str = ""):
        self.labels = dict(labels)
        self.fidelity = fidelity
        self.source = source
        self.calls = 0

    def label(self, candidates: Sequence[Candidate]) -> tuple[list[Label], dict[str, str]]:
        out, errors = [], {}
        for c in candidates:
            self.calls += 1
            lab = self.labels.get(c.candidate_id)
            if lab is None:
                errors[c.candidate_id] = f"no precomputed {self.fidelity} label for {c.candidate_id}"
            else:
                out.append(lab)
        return out, errors

    def truth(self) -> dict[str, Label]:
        """Every label (for benchmarks that score against the full answer; never given to the loop)."""
        return dict(self.labels)


class LabellerOracle:
    """Runs a :class:`pipeline.label.dft.Labeller` fidelity (any ASE calculator) through a LabelStore.

    The single point is done at the candidate's own structure (no high-fidelity relaxation)."""

    def __init__(self, store: Any, labeller: Any, fidelity: str):
        self.store = store
        self.labeller = labeller
        self.fidelity = fidelity

    def label(self, candidates: Sequence[Candidate]) -> tuple[list[Label], dict[str, str]]:
        result = self.store.label(self.labeller, {c.candidate_id: c.structure for c in candidates}, self.fidelity)
        by_name = {c.candidate_id: c for c in candidates}
        labels = [Label(name, by_name[name].structure, float(row["energy"]),
                        {"frame_id": row["frame_id"], "labelled_by": "labeller"})
                  for name, row in result.rows.items()]
        return labels, dict(result.errors)


def structure_frame(structure: Structure, *, frame_id: str, fidelity: str, energy: float, source: str,
                    material_id: str | None = None, run_type: str | None = None,
                    meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """An energy-only frame row (relaxed structures from databases have no forces or stresses)."""
    return frame_row(
        frame_id=frame_id, source=source, fidelity=fidelity, numbers=[s.specie.Z for s in structure],
        positions=structure.cart_coords, cell=structure.lattice.matrix, pbc=(True, True, True), energy=energy,
        material_id=material_id, run_type=run_type, meta=meta,
    )


def label_frames(labels: Iterable[Label], fidelity: str, source: str = "oracle") -> pa.Table:
    """High-fidelity labels as energy-only frames (``<source>:<candidate>:<fidelity>``)."""
    rows = [structure_frame(lab.structure, frame_id=f"{source}:{lab.candidate_id}:{fidelity}", fidelity=fidelity,
                            energy=lab.energy, source=source, material_id=lab.candidate_id,
                            meta={"candidate_id": lab.candidate_id, **dict(lab.meta)})
            for lab in labels]
    return frames_table(rows)


def load_res_pool(path: str | Path, low: str = "pbe", high: str = "r2scan",
                  mp2020: bool = True) -> tuple[Pool, LookupOracle]:
    """Real MP pool from ``.res`` files: candidates = materials with BOTH a GGA/GGA+U and an r2SCAN calculation.

    Candidates are predicted at their GGA(+U)-relaxed structure (the cheap fidelity everybody has); the oracle
    returns the r2SCAN-relaxed structure and raw r2SCAN energy. Low-fidelity frames: every GGA/GGA+U material of
    the file (raw energies; MP applies GGA+U to Ni in oxides, so the 'pbe' fidelity is GGA+U there, as in MP's
    own mixed GGA/GGA+U hull). With ``mp2020`` (default) the low-fidelity energies carry MP's
    MaterialsProject2020Compatibility corrections (O2- anion, Ni U correction), i.e. they are on the scale of MP's
    GGA_GGA+U hull; raw GGA and GGA+U energies are two different energy scales (Ni metal vs Ni oxides differ by
    ~1 eV/atom in r2SCAN - GGA(+U)), which no smooth fidelity gap bridges. Unreadable files raise one line
    naming the file.
    """
    from pipeline.hull.thermo import mp2020 as mp2020_compat
    from pipeline.hull.thermo import pymatgen_warnings_to_log
    from pipeline.sources.files.res import read_res_entries

    path = Path(path)
    entries, result = read_res_entries(path)
    if result.rejects:
        first = result.rejects[0]
        raise RecordError(f"{path}: {len(result.rejects)} unreadable .res file(s), e.g. {first}")
    by_run: dict[str, dict[str, Any]] = {"gga": {}, "r2scan": {}}
    for e in entries:
        run = str(e.parameters.get("run_type", "")).upper()
        mid = str(e.data.get("material_id") or e.entry_id)
        by_run["r2scan" if run == "R2SCAN" else "gga"][mid] = e
    compat = mp2020_compat() if mp2020 else None
    low_rows, candidates, labels = [], [], {}
    for mid, e in sorted(by_run["gga"].items()):
        run = str(e.parameters.get("run_type"))
        correction = 0.0
        if compat is not None:
            with pymatgen_warnings_to_log("MP2020 corrections of the pool"):
                processed = compat.process_entry(e)
            if processed is None:
                raise RecordError(f"{path}: {mid} ({run}) refused by MaterialsProject2020Compatibility")
            correction = float(processed.correction)
        energy = float(e.uncorrected_energy) + correction
        low_rows.append(structure_frame(e.structure, frame_id=f"mp-res:{mid}:{run}", fidelity=low,
                                        energy=energy, source="mp-res", material_id=mid, run_type=run,
                                        meta={"archive": str(path), "mp2020_correction_eV": correction,
                                              "uncorrected_energy": float(e.uncorrected_energy)}))
        hi = by_run["r2scan"].get(mid)
        if hi is not None:
            candidates.append(Candidate(mid, e.structure, energy))
            labels[mid] = Label(mid, hi.structure, float(hi.uncorrected_energy),
                                {"task_id": hi.data.get("task_id"), "source": f"mp-res:{mid}:R2SCAN"})
    missing = sorted(set(by_run["r2scan"]) - set(by_run["gga"]))
    pool = Pool(candidates, frames_table(low_rows), low=low, high=high, source=str(path),
                meta={"r2scan_without_gga": missing, "low_scale": "GGA/GGA+U + MP2020" if mp2020 else "raw",
                      "note": "candidates at GGA(+U)-relaxed structures; r2SCAN labels at r2SCAN-relaxed ones"})
    return pool, LookupOracle(labels, high, source=str(path))

