"""Generate the offline multi-fidelity demo data set (Li-Al, GPAW PBE + r2SCAN) under ``data/demo``.

    python -m pipeline.label.demo_set [--out data/demo] [--stop-at 11:55] [--max-variants 100]

Stages (each resumable: a re-run skips every frame / entry already stored, or already rejected):

1. ``references``: elements and known compounds built from their prototypes, relaxed (cell + positions, space
   group kept) at PBE, then at r2SCAN starting from the PBE structure -> ``entries/`` (both fidelities) and the
   ionic steps -> ``frames/``.
2. ``candidates``: phases that are NOT references, relaxed the same way -> ``candidates/`` (ground truth) and
   their unrelaxed starting structures -> ``candidates.extxyz``.
3. ``variants``: rattled and strained references and decorated fcc/bcc/hcp cells (<= 8 atoms), PBE for all,
   r2SCAN for one in ``R2SCAN_EVERY`` (see :func:`gets_r2scan`) -> ``frames/``.
4. ``test``: a separate set of variants (other seeds), r2SCAN only -> ``test_frames/`` (never in ``frames/``).

Structures of the known phases come from their published prototypes (see ``REFERENCE_PHASES``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from ase import Atoms
from ase.build import bulk
from ase.io import write as ase_write
from ase.spacegroup import crystal
from pymatgen.core.entries import ComputedStructureEntry
from pymatgen.io.ase import AseAtomsAdaptor

from pipeline.config import Settings
from pipeline.entries import entries_table, entry_to_row, row_to_entry
from pipeline.frames import frames_table
from pipeline.io import ParquetDataset, write_json_atomic
from pipeline.label.dft import Labeller, gpaw_fidelities
from pipeline.schema import ENTRIES_SCHEMA, FRAMES_SCHEMA, KEYS, REJECTS_SCHEMA

log = logging.getLogger("pipeline.label.demo_set")

PBE, R2SCAN = "gpaw-pbe", "gpaw-r2scan"
RUN_TYPE = {PBE: "PBE", R2SCAN: "R2SCAN"}
VARIANT_KINDS = ("decorated", "rattled", "strained")  # single points from scratch (not relaxation steps)
R2SCAN_EVERY = 5  # one training variant in 5 also gets r2SCAN (20 %), see gets_r2scan
RELAX_FMAX = 0.02  # eV/A (and the same on the cell through FrechetCellFilter)
RELAX_STEPS = 40


@dataclass(frozen=True)
class Phase:
    """A crystal built from its prototype: ``build()`` returns the primitive cell."""

    name: str  # e.g. "LiAl-B32"
    build: Callable[[], Atoms]
    source: str  # where the prototype comes from


def _li_bcc() -> Atoms:
    return bulk("Li", "bcc", a=3.44)


def _al_fcc() -> Atoms:
    return bulk("Al", "fcc", a=4.04)


def _lial_b32() -> Atoms:
    # NaTl type, Fd-3m (227), Li 8a (0,0,0), Al 8b (1/2,1/2,1/2), a = 6.37 A: 4 atoms in the primitive cell.
    return crystal(["Li", "Al"], basis=[(0, 0, 0), (0.5, 0.5, 0.5)], spacegroup=227,
                   cellpar=[6.37, 6.37, 6.37, 90, 90, 90], primitive_cell=True)


def _li3al2() -> Atoms:
    # R-3m (166), a = 4.508, c = 14.259 A (hexagonal axes), Li 3a, Li 6c, Al 6c: 5 atoms in the primitive cell.
    # z of the 6c sites at their ideal bcc-stacking values (Li 1/5, Al 2/5); relaxation refines them.
    return crystal(["Li", "Li", "Al"], basis=[(0, 0, 0), (0, 0, 0.2), (0, 0, 0.4)], spacegroup=166,
                   cellpar=[4.508, 4.508, 14.259, 90, 90, 120], primitive_cell=True)


def _lial3_l12() -> Atoms:
    # Cu3Au type (L1_2), Pm-3m (221), Li 1a, Al 3c, a = 4.01 A (metastable delta' precipitate).
    return crystal(["Li", "Al"], basis=[(0, 0, 0), (0, 0.5, 0.5)], spacegroup=221,
                   cellpar=[4.01, 4.01, 4.01, 90, 90, 90])


def _lial_b2() -> Atoms:
    return crystal(["Li", "Al"], basis=[(0, 0, 0), (0.5, 0.5, 0.5)], spacegroup=221, cellpar=[3.15] * 3 + [90] * 3)


def _li3al_l12() -> Atoms:
    return crystal(["Al", "Li"], basis=[(0, 0, 0), (0, 0.5, 0.5)], spacegroup=221, cellpar=[4.30] * 3 + [90] * 3)


def _li2al_c11b() -> Atoms:
    # MoSi2 type (C11_b), I4/mmm (139): Al 2a, Li 4e (0,0,1/3) - a bcc superstructure with c = 3a.
    a = 3.25
    return crystal(["Al", "Li"], basis=[(0, 0, 0), (0, 0, 1 / 3)], spacegroup=139,
                   cellpar=[a, a, 3 * a, 90, 90, 90], primitive_cell=True)


REFERENCE_PHASES: tuple[Phase, ...] = (
    Phase("Li-bcc", _li_bcc, "Li bcc (Im-3m), A2 prototype"),
    Phase("Al-fcc", _al_fcc, "Al fcc (Fm-3m), A1 prototype"),
    Phase("LiAl-B32", _lial_b32, "NaTl type Fd-3m, Li 8a / Al 8b, a=6.37 A (Kuriyama & Masaki 1975, ICSD)"),
    Phase("Li3Al2-R-3m", _li3al2, "R-3m, a=4.508 c=14.259 A, Li 3a+6c, Al 6c (Tebbe, Schafer & Schafer 1973)"),
    Phase("LiAl3-L12", _lial3_l12, "Cu3Au type L1_2 Pm-3m, a=4.01 A (metastable delta' phase of Al-Li alloys)"),
)

CANDIDATE_PHASES: tuple[Phase, ...] = (
    Phase("LiAl-B2", _lial_b2, "CsCl type B2 (bcc ordering at x=1/2; competes with B32)"),
    Phase("Li2Al-C11b", _li2al_c11b, "MoSi2 type C11_b bcc superstructure (hypothetical)"),
    Phase("Li3Al-L12", _li3al_l12, "Cu3Au type L1_2, Li on the faces (hypothetical)"),
)

#: Approximate PBE volumes per atom (A^3) for Vegard's-law guesses of decorated cells.
VOLUME_PER_ATOM = {"Li": 20.3, "Al": 16.5}


# ----------------------------------------------------------------------------------------------- variants


def _scale_to_vegard(atoms: Atoms) -> Atoms:
    target = sum(VOLUME_PER_ATOM[s] for s in atoms.get_chemical_symbols())
    atoms.set_cell(atoms.cell * (target / atoms.get_volume()) ** (1 / 3), scale_atoms=True)
    return atoms


def _parent_lattices() -> list[tuple[str, Atoms]]:
    """Small fcc/bcc/hcp cells (2-8 sites) whose sites get decorated with Li/Al."""
    fcc_p, bcc_c, hcp = bulk("Al", "fcc", a=4.0), bulk("Al", "bcc", a=3.2, cubic=True), bulk("Al", "hcp", a=2.85)
    return [
        ("bcc2", bcc_c), ("hcp2", hcp), ("fcc2", fcc_p.repeat((2, 1, 1))),
        ("fcc4", bulk("Al", "fcc", a=4.0, cubic=True)), ("bcc4", bcc_c.repeat((2, 1, 1))),
        ("hcp4", hcp.repeat((2, 1, 1))), ("fcc3", fcc_p.repeat((3, 1, 1))), ("bcc6", bcc_c.repeat((3, 1, 1))),
        ("fcc8", fcc_p.repeat((2, 2, 2))), ("bcc8", bcc_c.repeat((2, 2, 1))),
    ]


def _decorated(rng: np.random.Generator, index: int) -> tuple[str, Atoms, dict[str, Any]]:
    lattices = _parent_lattices()
    weights = np.array([4, 4, 3, 3, 3, 3, 2, 1, 1, 1], dtype=float)  # mostly small cells (cost)
    name, parent = lattices[rng.choice(len(lattices), p=weights / weights.sum())]
    atoms = parent.copy()
    n = len(atoms)
    n_li = int(rng.integers(1, n)) if n > 1 else int(rng.integers(0, 2))
    numbers = np.full(n, 13)
    numbers[rng.choice(n, size=n_li, replace=False)] = 3
    atoms.set_atomic_numbers(numbers)
    _scale_to_vegard(atoms)
    atoms.rattle(0.03, seed=int(rng.integers(1 << 30)))
    return f"decorated-{name}-{index:03d}", atoms, {"kind": "decorated", "parent": name}


def _strain(atoms: Atoms, rng: np.random.Generator, max_strain: float) -> Atoms:
    eps = rng.uniform(-max_strain, max_strain, size=(3, 3))
    eps = 0.5 * (eps + eps.T)
    out = atoms.copy()
    out.set_cell(atoms.cell.array @ (np.eye(3) + eps), scale_atoms=True)
    return out


def _supercell_upto8(atoms: Atoms) -> Atoms:
    """Repeat a small primitive cell along its shortest axes while it stays <= 8 atoms (>= 2 atoms)."""
    out = atoms.copy()
    for axis in np.argsort(out.cell.lengths()):
        if len(out) * 2 <= 8 and len(out) < 4:
            reps = [1, 1, 1]
            reps[axis] = 2
            out = out.repeat(reps)
    return out


def variant_structures(references: dict[str, Atoms], seed: int, count: int, prefix: str = "") -> Iterator[
        tuple[str, Atoms, dict[str, Any]]]:
    """``count`` variants in a fixed round-robin order (decorated, rattled, strained, decorated, ...).

    Deterministic for a given seed and reference set, so a re-run regenerates the same ids.
    """
    rng = np.random.default_rng(seed)
    names = sorted(references)
    kinds = ("decorated", "rattled", "decorated", "strained", "rattled")
    for i in range(count):
        kind = kinds[i % len(kinds)]
        if kind == "decorated":
            vid, atoms, meta = _decorated(rng, i)
        else:
            parent = names[int(rng.integers(len(names)))]
            base = references[parent]
            if kind == "rattled":
                atoms = _strain(_supercell_upto8(base), rng, 0.02)
                sigma = float(rng.choice([0.03, 0.06, 0.1]))
                atoms.rattle(sigma, seed=int(rng.integers(1 << 30)))
                meta = {"kind": "rattled", "parent": parent, "rattle_sigma": sigma}
            else:
                atoms = _strain(base, rng, 0.04)
                meta = {"kind": "strained", "parent": parent}
            vid = f"{kind}-{parent}-{i:03d}"
        yield prefix + vid, atoms, meta


def gets_r2scan(index: int) -> bool:
    """One variant in each block of ``R2SCAN_EVERY`` also gets r2SCAN, at a position that rotates from block to
    block so that every kind of the round robin (which also has period 5) is in the r2SCAN subset."""
    return index % R2SCAN_EVERY == (index // R2SCAN_EVERY) % R2SCAN_EVERY


# ------------------------------------------------------------------------------------------------ writer


#: The folders of a project data set (data/demo, data/sisn): name -> (schema, key).
PARTS = {"frames": (FRAMES_SCHEMA, KEYS["frames"]), "test_frames": (FRAMES_SCHEMA, KEYS["frames"]),
         "entries": (ENTRIES_SCHEMA, KEYS["entries"]), "candidates": (ENTRIES_SCHEMA, KEYS["entries"]),
         "rejects": (REJECTS_SCHEMA, KEYS["rejects"])}


def part_dataset(root: Path, part: str) -> ParquetDataset:
    """The ``part`` folder (see :data:`PARTS`) of the data set in ``root``."""
    schema, key = PARTS[part]
    return ParquetDataset(Path(root) / part, schema, key)


def read_part(root: Path, part: str) -> pa.Table:
    """Read the ``part`` folder of the data set in ``root``; a clear error when it is missing."""
    ds = part_dataset(root, part)
    if not ds.exists():
        raise FileNotFoundError(f"{ds.path}: no Parquet parts (regenerate the set: see {Path(root) / 'README.md'})")
    return ds.read()


class DeadlineReached(Exception):
    """The --stop-at time has passed: no new calculation is started."""


class DemoSet:
    """The folders of the demo set, and the resumable stages that fill them."""

    #: prefix of entry ids (``<prefix>-<phase>-<fidelity>``), and what the manifest says about the set
    prefix = "demo"
    command = "python -m pipeline.label.demo_set"
    system = "Li-Al"
    elements = frozenset({"Li", "Al"})

    def __init__(self, out: Path, labeller: Labeller, deadline: float | None = None):
        self.out = Path(out)
        self.labeller = labeller
        self.deadline = deadline
        self.frames, self.test_frames, self.entries, self.candidates, self.rejects = (
            part_dataset(self.out, p) for p in PARTS)

    # -- helpers
    def out_of_time(self) -> bool:
        return self.deadline is not None and time.time() > self.deadline

    def _todo(self, key: str, skip: set[str]) -> bool:
        """Whether ``key`` still needs a calculation; raises :class:`DeadlineReached` when out of time."""
        if key in skip:
            return False
        if self.out_of_time():
            raise DeadlineReached(key)
        return True

    def _rejected(self) -> set[str]:
        return {r["record_id"] for r in self.rejects.read(columns=["record_id"]).to_pylist()}

    def _reject(self, record_id: str, exc: BaseException) -> None:
        log.warning("rejected %s: %s", record_id, exc)
        self.rejects.append(
            pa.Table.from_pylist(
                [{"record_id": record_id, "source": "gpaw", "error": f"{type(exc).__name__}: {exc}"}],
                schema=REJECTS_SCHEMA,
            )
        )

    def _entry_ids(self, dataset: ParquetDataset) -> set[str]:
        return {r["entry_id"] for r in dataset.read(columns=["entry_id"]).to_pylist()}

    def relaxed_structures(self, dataset: ParquetDataset, fidelity: str) -> dict[str, Atoms]:
        """Relaxed structures stored in ``dataset`` at ``fidelity``, by phase name."""
        out = {}
        for row in dataset.read().to_pylist():
            if row["fidelity"] == fidelity:
                name = row["entry_id"].removeprefix(f"{self.prefix}-").removesuffix(f"-{fidelity}")
                out[name] = AseAtomsAdaptor.get_atoms(row_to_entry(row).structure)
        return out

    # -- stages
    def relax_phases(self, phases: tuple[Phase, ...], dataset: ParquetDataset, kind: str) -> None:
        """PBE relaxation from the prototype, then r2SCAN from the PBE structure; entries + ionic-step frames."""
        try:
            for fidelity in (PBE, R2SCAN):
                self._relax_all(phases, dataset, kind, fidelity)
        except DeadlineReached as stop:
            log.info("deadline reached: stopping before %s", stop)

    def _relax_all(self, phases: tuple[Phase, ...], dataset: ParquetDataset, kind: str, fidelity: str) -> None:
        skip = self._entry_ids(dataset) | self._rejected()
        pbe_relaxed = self.relaxed_structures(dataset, PBE)
        for phase in phases:
            entry_id = f"{self.prefix}-{phase.name}-{fidelity}"
            if not self._todo(entry_id, skip):
                continue
            start = phase.build() if fidelity == PBE else pbe_relaxed.get(phase.name)
            if start is None:
                log.warning("no PBE structure for %s: skipping its r2SCAN relaxation", phase.name)
                continue
            t0 = time.perf_counter()
            try:
                relaxed, rows = self.labeller.relax(
                    start, fidelity, f"gpaw:{kind}-{phase.name}:{fidelity}:relax", fmax=RELAX_FMAX,
                    steps=RELAX_STEPS, meta={"parent": phase.name, "phase_kind": kind},
                )
            except Exception as exc:  # noqa: BLE001 - recorded and skipped
                self._reject(entry_id, exc)
                continue
            seconds = time.perf_counter() - t0
            fid = self.labeller.fidelity(fidelity)
            # the last ionic step IS the relaxed structure: it is the "reference" frame (no duplicate row)
            final = rows[-1]
            meta = {**json.loads(final["meta"]), "kind": kind, "relaxed": True, "relax_steps": len(rows),
                    "relax_seconds": round(seconds, 1)}
            final["meta"] = json.dumps(meta, sort_keys=True)
            entry = ComputedStructureEntry(
                AseAtomsAdaptor.get_structure(relaxed), relaxed.get_potential_energy(),
                parameters={"run_type": RUN_TYPE[fidelity], "settings": dict(fid.settings),
                            "settings_hash": fid.settings_hash, "software": dict(fid.software)},
                data={"phase": phase.name, "prototype": phase.source, "relax_steps": len(rows),
                      "relax_seconds": round(seconds, 1), "max_force": float(np.abs(relaxed.get_forces()).max())},
                entry_id=entry_id,
            )
            if kind == "reference":  # candidates' frames stay out of training: they are the test truth
                self.frames.append(frames_table(rows))
            dataset.append(entries_table([entry_to_row(
                entry, source="gpaw", thermo_type="raw", fidelity=fidelity, meta={"kind": kind})]))
            log.info("%s: %.4f eV/atom, %d steps, %.0f s", entry_id, entry.energy_per_atom, len(rows), seconds)

    def label_variants(self, references: dict[str, Atoms], count: int, seed: int, test: bool = False) -> None:
        """PBE (+ r2SCAN where :func:`gets_r2scan`) for training variants; r2SCAN only for the test set."""
        target = self.test_frames if test else self.frames
        skip = target.keys() | self._rejected()
        prefix = "test-" if test else ""
        todo = []
        for i, (vid, atoms, meta) in enumerate(variant_structures(references, seed, count, prefix)):
            fidelities = [R2SCAN] if test else ([PBE, R2SCAN] if gets_r2scan(i) else [PBE])
            todo += [(f"gpaw:{vid}:{fidelity}", fidelity, atoms, meta) for fidelity in fidelities]
        try:
            for frame_id, fidelity, atoms, meta in todo:
                if not self._todo(frame_id, skip):
                    continue
                try:
                    row = self.labeller.label(atoms, fidelity, frame_id, meta={**meta, "test": test})
                except Exception as exc:  # noqa: BLE001 - recorded and skipped
                    self._reject(frame_id, exc)
                    continue
                target.append(frames_table([row]))
                log.info("%s: %d atoms, %.1f s", frame_id, len(atoms), json.loads(row["meta"])["seconds"])
        except DeadlineReached as stop:
            log.info("deadline reached: stopping before %s", stop)

    def write_candidates_extxyz(self) -> None:
        images = []
        for phase in CANDIDATE_PHASES:
            built = phase.build()  # plain Atoms: no spacegroup bookkeeping from ase.spacegroup.crystal
            atoms = Atoms(numbers=built.numbers, positions=built.positions, cell=built.cell, pbc=True)
            atoms.info.update(candidate_id=f"demo-{phase.name}", prototype=phase.source)
            images.append(atoms)
        tmp = self.out / ".candidates.extxyz.tmp"
        ase_write(tmp, images, format="extxyz")
        tmp.replace(self.out / "candidates.extxyz")

    def compact(self) -> None:
        for ds in (self.frames, self.test_frames, self.entries, self.candidates, self.rejects):
            if ds.exists():
                ds.compact()

    def write_manifest(self) -> dict[str, Any]:
        frames = self.frames.read().to_pylist() if self.frames.exists() else []
        test = self.test_frames.read().to_pylist() if self.test_frames.exists() else []
        fids = self.labeller.fidelities

        entries = self.entries.read().to_pylist() if self.entries.exists() else []
        cands = self.candidates.read().to_pylist() if self.candidates.exists() else []
        manifest = {
            "generated_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "command": self.command,
            "system": self.system,
            "fidelities": {name: {"run_type": f.run_type, "settings": dict(f.settings),
                                  "settings_hash": f.settings_hash} for name, f in fids.items()},
            "software": dict(next(iter(fids.values())).software),
            "counts": {
                "frames": len(frames), "test_frames": len(test), "entries": len(entries), "candidates": len(cands),
                "rejects": self.rejects.read().num_rows if self.rejects.exists() else 0,
            },
            "frames": frame_summary(frames),
            "test_frames": frame_summary(test),
            "entries": {r["entry_id"]: {"energy_per_atom": r["energy_per_atom"], "formula": r["formula"],
                                        **{k: json.loads(r["data"]).get(k) for k in ("relax_steps", "relax_seconds")}}
                        for r in entries + cands},
            "hull": hull_summary(entries, cands, self.elements),
        }
        self.manifest_extra(manifest, frames, test)
        write_json_atomic(self.out / "manifest.json", manifest, sort_keys=True)
        return manifest


    def manifest_extra(self, manifest: dict[str, Any], frames: list[dict[str, Any]],
                       test: list[dict[str, Any]]) -> None:
        """Hook for subclasses: add set-specific fields to ``manifest`` (in place)."""


def frame_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per fidelity: frame count, counts by kind, compute seconds and single-point seconds by cell size."""
    out: dict[str, Any] = {}
    for r in rows:
        m = json.loads(r["meta"] or "{}")
        s = out.setdefault(r["fidelity"], {"frames": 0, "by_kind": {}, "seconds_total": 0.0, "by_natoms": {}})
        s["frames"] += 1
        s["by_kind"][m.get("kind", "?")] = s["by_kind"].get(m.get("kind", "?"), 0) + 1
        if r["ionic_step"] is not None or m.get("kind") in VARIANT_KINDS:
            s["seconds_total"] += m.get("seconds", 0.0)
            if m.get("kind") in VARIANT_KINDS:  # single points from scratch
                b = s["by_natoms"].setdefault(str(len(r["numbers"])), [])
                b.append(m.get("seconds", 0.0))
    for s in out.values():
        s["seconds_total"] = round(s["seconds_total"], 1)
        s["single_point_seconds_by_natoms"] = {
            k: {"n": len(v), "mean": round(float(np.mean(v)), 1), "max": round(float(np.max(v)), 1)}
            for k, v in sorted(s.pop("by_natoms").items(), key=lambda kv: int(kv[0]))}
    return out


def hull_summary(entries: list[dict[str, Any]], candidates: list[dict[str, Any]],
                 elements: frozenset[str] = frozenset({"Li", "Al"})) -> dict[str, Any]:
    """Formation energy and energy above the reference hull (eV/atom) of every entry, per fidelity (a fidelity
    is left out until every element of ``elements`` has an elemental reference at it)."""
    from pymatgen.analysis.phase_diagram import PhaseDiagram

    out: dict[str, Any] = {}
    for fidelity in (PBE, R2SCAN):
        refs = [row_to_entry(r) for r in entries if r["fidelity"] == fidelity]
        present = {str(el) for e in refs if len(e.composition) == 1 for el in e.composition}
        if present != set(elements):
            continue
        pd = PhaseDiagram(refs)
        out[fidelity] = {
            e.entry_id: {"formation_energy_per_atom": round(float(pd.get_form_energy_per_atom(e)), 4),
                         "e_above_hull": round(float(pd.get_e_above_hull(e, allow_negative=True)), 4)}
            for e in refs + [row_to_entry(r) for r in candidates if r["fidelity"] == fidelity]
        }
    return out


README_HEAD = """\
# Li-Al multi-fidelity DFT demo set (GPAW PBE + r2SCAN)

Made by the project itself, with real DFT, for the offline demo and the training tests (the Materials Project
cannot be reached offline, and the shared MP files have forces only at GGA). Energies are GPAW's, on GPAW's own
reference scale (not MP's, not VASP's): fidelities are named by source, `gpaw-pbe` and `gpaw-r2scan`.

Regenerate (resumable: stop it any time, re-run the same command and it continues; everything stored or
rejected is skipped):

    scripts/install_dft.sh                       # once: apt libxc/BLAS/MPI/FFTW + pip gpaw gpaw-data
    OMP_NUM_THREADS=1 python -m pipeline.label.demo_set [--stop-at HH:MM] [--max-variants 100] [--n-test 8]

`--stop-at` (UTC) starts no new calculation after that time; re-running later adds the rest. This README and
`manifest.json` are rewritten from the data at the end of every run.

## Layout

| path | content |
|---|---|
| `frames/` | ParquetDataset, `FRAMES_SCHEMA`, key `frame_id`: every TRAINING frame (energy, forces, stress) |
| `test_frames/` | held-out r2SCAN frames (other random seeds); never in `frames/`, never for training |
| `entries/` | `ENTRIES_SCHEMA`: relaxed reference phases at both fidelities, `thermo_type="raw"`, no corrections |
| `candidates/` | `ENTRIES_SCHEMA`: relaxed candidate phases (not references) = E_hull ground truth of the demo |
| `candidates.extxyz` | the candidates' UNRELAXED starting structures, `info["candidate_id"]` = entry_id stem |
| `rejects/` | failed calculations with their error (`REJECTS_SCHEMA`), skipped on re-runs |
| `manifest.json` | counts, settings, versions, per-calculation timings, formation energies |

Frame ids: `gpaw:<structure>:<fidelity>` (single points) and `gpaw:reference-<phase>:<fidelity>:relax:<step>`
(ionic steps of the relaxations; the last step, `meta.kind == "reference"`, is the relaxed structure).
`meta` (JSON) holds `kind` (reference | relax-step | rattled | strained | decorated), `parent`, `settings`,
`settings_hash` (one per fidelity: frames with equal hashes share one energy scale), `software` versions and
`seconds` (wall time of that calculation, or of that ionic step, on one core). Stress is in eV/A^3 with the
ASE sign (tensile positive); GPAW gives it for PBE and for r2SCAN here, so no stress is missing.
Entries: `entry_id` = `demo-<phase>-<fidelity>`, `run_type` PBE / R2SCAN, `parameters["settings"]`,
`data` = prototype source, relaxation steps and time.

## DFT settings (both fidelities identical except the functional)

* GPAW plane waves, cutoff 300 eV; Gamma-centred Monkhorst-Pack grid with ASE k-point density 3.0 per
  reciprocal Angstrom (grid_i = ceil(3.0 |b_i|), |b_i| including 2 pi; ~0.33 A^-1 spacing); Fermi-Dirac smearing
  0.1 eV (energies extrapolated to zero width); GPAW default SCF convergence; symmetry found by GPAW.
* PBE: `xc="PBE"`. r2SCAN: libxc `MGGA_X_R2SCAN+MGGA_C_R2SCAN`. PAW setups: GPAW's PBE setups from
  `gpaw-data` (Li: 1 valence electron, 1s frozen; Al: 3 valence electrons), used for both functionals
  (there are no r2SCAN PAW setups).
* Relaxations: ASE BFGS on a FrechetCellFilter with FixSymmetry (space group kept), fmax 0.02 eV/A, at most
  40 steps. r2SCAN relaxations start from the PBE-relaxed structure.
* Convergence (measured, PBE, LiAl B32 formation energy, meV/atom): k-density 2.0: -117.3, 3.0: -193.4,
  4.5: -185.9; cutoff 450 eV at k-density 4.5: -185.8 (cutoff 300 eV is converged to 0.1 meV/atom).
  So the k-point sampling chosen (3.0) is ~8 meV/atom off the converged formation energy: the cost limit
  of a 2-core developer session. Do not read hull distances below ~10 meV/atom as significant.

## Structures

Reference phases (built from their prototypes with `ase.spacegroup.crystal`, then relaxed):

* Li bcc (A2, Im-3m), Al fcc (A1, Fm-3m).
* LiAl B32 (NaTl type, Fd-3m, Li 8a / Al 8b, a = 6.37 A; 4 atoms in the primitive cell).
* Li3Al2 (R-3m, a = 4.508 A, c = 14.259 A, Li 3a + 6c, Al 6c; Tebbe, Schafer & Schafer, Z. Naturforsch. 1973);
  the 6c z parameters start at their ideal bcc-stacking values (Li 1/5, Al 2/5) and are relaxed.
* LiAl3 L1_2 (Cu3Au type, metastable delta' precipitate of Al-Li alloys, a = 4.01 A).
* Li9Al4 (C2/m, 13 atoms in the primitive cell) is left out: measured costs (Li3Al2, 5 atoms: 127 s PBE +
  188 s r2SCAN relaxation on one core) put it near an hour per fidelity at lower symmetry.

Candidates (not references; ground truth for the demo E_hull report): LiAl B2 (CsCl), Li2Al C11_b (MoSi2 type
bcc superstructure, hypothetical), Li3Al L1_2 (hypothetical); relaxed at PBE and r2SCAN like the references.
Their relaxation frames are NOT in `frames/`.

Training variants (<= 8 atoms, deterministic seeds, round robin decorated / rattled / decorated / strained /
rattled): *decorated* fcc/bcc/hcp cells of 2-8 sites with random Li/Al occupation at Vegard volume, rattled
0.03 A; *rattled*: PBE-relaxed references repeated to 2-8 atoms, +-2 % strain, rattled 0.03/0.06/0.1 A;
*strained*: PBE-relaxed primitive references with a random symmetric strain up to 4 %. PBE for all; r2SCAN
also for one variant in five, at a position rotating from block to block so that all kinds are covered
(`gets_r2scan`). A first run picked exactly every 5th variant (all of them decorated cells); those 20 r2SCAN
frames (variants 0, 5, ..., 95) were kept, so the r2SCAN share of the variants is a little above 20 %.
The held-out test set uses the same recipe with another seed, r2SCAN only.
"""


def readme_tables(manifest: dict[str, Any]) -> str:
    """Markdown tables of counts, timings and formation energies from the manifest."""
    lines = ["## Counts (this commit)", "", "| set | fidelity | frames | by kind |", "|---|---|---|---|"]
    for part in ("frames", "test_frames"):
        for fid, s in sorted(manifest[part].items()):
            kinds = ", ".join(f"{k} {v}" for k, v in sorted(s["by_kind"].items()))
            lines.append(f"| `{part}/` | {fid} | {s['frames']} | {kinds} |")
    c = manifest["counts"]
    variants = {f: sum(n for k, n in s["by_kind"].items() if k in ("decorated", "rattled", "strained"))
                for f, s in manifest["frames"].items()}
    compute = sum(s["seconds_total"] for part in ("frames", "test_frames") for s in manifest[part].values())
    relax = sum(v.get("relax_seconds") or 0.0 for v in manifest["entries"].values())
    lines += ["", f"Entries: {c['entries']}, candidates: {c['candidates']}, rejected calculations: {c['rejects']}.",
              (f"Training variants: {variants.get(PBE, 0)} with PBE, {variants.get(R2SCAN, 0)} of them also with "
              f"r2SCAN ({100 * variants.get(R2SCAN, 0) / max(variants.get(PBE, 0), 1):.0f} %)."),
              (f"Compute, one core shared with other jobs (so upper bounds): {compute / 60:.0f} min for the frames "
               f"(single points + ionic steps of the reference relaxations); all relaxations of references and "
               f"candidates: {relax / 60:.0f} min."),
              "", "## Time per single-point calculation (one core, seconds; from `meta.seconds`)", "",
              "| fidelity | atoms | n | mean | max |", "|---|---|---|---|---|"]
    for part in ("frames", "test_frames"):
        for fid, s in sorted(manifest[part].items()):
            for nat, t in s["single_point_seconds_by_natoms"].items():
                lines.append(f"| {fid} ({part}) | {nat} | {t['n']} | {t['mean']} | {t['max']} |")
    lines += ["", "Relaxations (one core, whole relaxation):", "", "| entry | steps | seconds |", "|---|---|---|"]
    lines += [f"| {k} | {v['relax_steps']} | {v['relax_seconds']} |" for k, v in sorted(manifest["entries"].items())]
    lines += ["", "## Formation energies and energy above the reference hull (eV/atom)", "",
              "Reference hull = the relaxed reference phases of the same fidelity; candidates are placed on it.", "",
              "| entry | E_f PBE | E_hull PBE | E_f r2SCAN | E_hull r2SCAN |", "|---|---|---|---|---|"]
    hull = manifest.get("hull", {})
    lines += hull_rows(hull)
    below = [f"{k} ({v['e_above_hull']:+.4f})" for f, d in sorted(hull.items()) for k, v in sorted(d.items())
             if v["e_above_hull"] < 0]
    if below:
        lines += ["", "Negative E_hull = below the hull of the references (a candidate the reference set misses): "
                  + ", ".join(below) + ". Hull distances within ~10 meV/atom are below the k-point error."]
    return "\n".join(lines) + "\n"


def hull_rows(hull: dict[str, Any]) -> list[str]:
    """Markdown rows ``| phase | E_f PBE | E_hull PBE | E_f r2SCAN | E_hull r2SCAN |`` of a manifest's hull."""
    rows = []
    for name in sorted({k.removesuffix(f"-{f}") for f, d in hull.items() for k in d}):
        cells = []
        for fid in (PBE, R2SCAN):
            v = hull.get(fid, {}).get(f"{name}-{fid}")
            cells += [f"{v['formation_energy_per_atom']:.4f}", f"{v['e_above_hull']:.4f}"] if v else ["", ""]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return rows


def write_readme(out: Path, manifest: dict[str, Any]) -> None:
    from pipeline.io import write_text_atomic

    write_text_atomic(out / "README.md", README_HEAD + "\n" + readme_tables(manifest))


def run(out: Path, stages: list[str], max_variants: int, n_test: int, deadline: float | None) -> DemoSet:
    demo = DemoSet(out, Labeller(gpaw_fidelities(), source="gpaw"), deadline)
    if "references" in stages:
        demo.relax_phases(REFERENCE_PHASES, demo.entries, "reference")
        demo.compact()
    if "candidates" in stages:
        demo.write_candidates_extxyz()
        demo.relax_phases(CANDIDATE_PHASES, demo.candidates, "candidate")
        demo.compact()
    refs = demo.relaxed_structures(demo.entries, PBE)
    if "variants" in stages and refs:
        first = min(max_variants, 30)
        demo.label_variants(refs, first, seed=2026)  # a balanced first batch (ids are a prefix of the full run)
        demo.compact()
        if "test" in stages:
            demo.label_variants(refs, n_test, seed=7, test=True)
            demo.compact()
        demo.label_variants(refs, max_variants, seed=2026)
        demo.compact()
    elif "test" in stages and refs:
        demo.label_variants(refs, n_test, seed=7, test=True)
        demo.compact()
    write_readme(demo.out, demo.write_manifest())
    return demo


def _deadline(text: str | None) -> float | None:
    if not text:
        return None
    hh, mm = (int(x) for x in text.split(":"))
    now = dt.datetime.now(dt.UTC)
    at = now.replace(hour=hh, minute=mm, second=0, microsecond=0)
    if at < now:
        at += dt.timedelta(days=1)
    return at.timestamp()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Settings().demo_dir)
    ap.add_argument("--stages", default="references,candidates,variants,test")
    ap.add_argument("--max-variants", type=int, default=100)
    ap.add_argument("--n-test", type=int, default=8)
    ap.add_argument("--stop-at", default=None, help="UTC HH:MM: start no new calculation after it")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    run(args.out, args.stages.split(","), args.max_variants, args.n_test, _deadline(args.stop_at))


if __name__ == "__main__":
    main()
