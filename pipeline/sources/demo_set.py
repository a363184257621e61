"""Generate the offline multi-fidelity demo data set (Li-Al, GPAW PBE + r2SCAN) under ``data/demo``.

    python -m pipeline.sources.demo_set [--out data/demo] [--stop-at 11:55] [--max-variants 100]

Stages (each resumable: a re-run skips every frame / entry already stored, or already rejected):

1. ``references``: elements and known compounds built from their prototypes, relaxed (cell + positions, space
   group kept) at PBE, then at r2SCAN starting from the PBE structure -> ``entries/`` (both fidelities) and the
   ionic steps -> ``frames/``.
2. ``candidates``: phases that are NOT references, relaxed the same way -> ``candidates/`` (ground truth) and
   their unrelaxed starting structures -> ``candidates.extxyz``.
3. ``variants``: rattled and strained references and decorated fcc/bcc/hcp cells (<= 8 atoms), PBE for all,
   r2SCAN for every ``R2SCAN_EVERY``-th -> ``frames/``.
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
from pipeline.schema import ENTRIES_SCHEMA, FRAMES_SCHEMA, KEYS, REJECTS_SCHEMA
from pipeline.sources.dft import Labeller, gpaw_fidelities

log = logging.getLogger("pipeline.sources.demo_set")

PBE, R2SCAN = "gpaw-pbe", "gpaw-r2scan"
RUN_TYPE = {PBE: "PBE", R2SCAN: "R2SCAN"}
R2SCAN_EVERY = 5  # every 5th training variant also gets r2SCAN (20 %)
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


# ------------------------------------------------------------------------------------------------ writer


class DemoSet:
    """The folders of the demo set, and the resumable stages that fill them."""

    def __init__(self, out: Path, labeller: Labeller, deadline: float | None = None):
        self.out = Path(out)
        self.labeller = labeller
        self.deadline = deadline
        self.frames = ParquetDataset(self.out / "frames", FRAMES_SCHEMA, KEYS["frames"])
        self.test_frames = ParquetDataset(self.out / "test_frames", FRAMES_SCHEMA, KEYS["frames"])
        self.entries = ParquetDataset(self.out / "entries", ENTRIES_SCHEMA, KEYS["entries"])
        self.candidates = ParquetDataset(self.out / "candidates", ENTRIES_SCHEMA, KEYS["entries"])
        self.rejects = ParquetDataset(self.out / "rejects", REJECTS_SCHEMA, KEYS["rejects"])

    # -- helpers
    def out_of_time(self) -> bool:
        return self.deadline is not None and time.time() > self.deadline

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
                name = row["entry_id"].removeprefix("demo-").removesuffix(f"-{fidelity}")
                out[name] = AseAtomsAdaptor.get_atoms(row_to_entry(row).structure)
        return out

    # -- stages
    def relax_phases(self, phases: tuple[Phase, ...], dataset: ParquetDataset, kind: str) -> None:
        """PBE relaxation from the prototype, then r2SCAN from the PBE structure; entries + ionic-step frames."""
        for fidelity in (PBE, R2SCAN):
            done, rejected = self._entry_ids(dataset), self._rejected()
            pbe_relaxed = self.relaxed_structures(dataset, PBE)
            for phase in phases:
                entry_id = f"demo-{phase.name}-{fidelity}"
                if entry_id in done or entry_id in rejected:
                    continue
                if self.out_of_time():
                    log.info("deadline reached: stopping before %s", entry_id)
                    return
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
                # the last ionic step IS the relaxed structure: it is the "reference" frame (no duplicate row)
                final = rows[-1]
                meta = {**json.loads(final["meta"]), "kind": kind, "relaxed": True, "relax_steps": len(rows),
                        "relax_seconds": round(seconds, 1)}
                final["meta"] = json.dumps(meta, sort_keys=True)
                entry = ComputedStructureEntry(
                    AseAtomsAdaptor.get_structure(relaxed), relaxed.get_potential_energy(),
                    parameters={"run_type": RUN_TYPE[fidelity], "settings": dict(
                        self.labeller.fidelity(fidelity).settings)},
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
        """PBE (+ r2SCAN on every R2SCAN_EVERY-th) for training variants; r2SCAN only for the test set."""
        target = self.test_frames if test else self.frames
        done, rejected = target.keys(), self._rejected()
        prefix = "test-" if test else ""
        for i, (vid, atoms, meta) in enumerate(variant_structures(references, seed, count, prefix)):
            fidelities = [R2SCAN] if test else ([PBE, R2SCAN] if i % R2SCAN_EVERY == 0 else [PBE])
            for fidelity in fidelities:
                frame_id = f"gpaw:{vid}:{fidelity}"
                if frame_id in done or frame_id in rejected:
                    continue
                if self.out_of_time():
                    log.info("deadline reached: stopping before %s", frame_id)
                    return
                try:
                    row = self.labeller.label(atoms, fidelity, frame_id, meta={**meta, "test": test})
                except Exception as exc:  # noqa: BLE001 - recorded and skipped
                    self._reject(frame_id, exc)
                    continue
                target.append(frames_table([row]))
                log.info("%s: %d atoms, %.1f s", frame_id, len(atoms), json.loads(row["meta"])["seconds"])

    def write_candidates_extxyz(self) -> None:
        images = []
        for phase in CANDIDATE_PHASES:
            atoms = phase.build()
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

        def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
            out: dict[str, Any] = {}
            for r in rows:
                m = json.loads(r["meta"] or "{}")
                s = out.setdefault(r["fidelity"], {"frames": 0, "by_kind": {}, "seconds_total": 0.0, "by_natoms": {}})
                s["frames"] += 1
                s["by_kind"][m.get("kind", "?")] = s["by_kind"].get(m.get("kind", "?"), 0) + 1
                if r["ionic_step"] is not None or m.get("kind") in ("decorated", "rattled", "strained"):
                    s["seconds_total"] += m.get("seconds", 0.0)
                    if m.get("kind") in ("decorated", "rattled", "strained"):  # single points from scratch
                        b = s["by_natoms"].setdefault(str(len(r["numbers"])), [])
                        b.append(m.get("seconds", 0.0))
            for s in out.values():
                s["seconds_total"] = round(s["seconds_total"], 1)
                s["single_point_seconds_by_natoms"] = {
                    k: {"n": len(v), "mean": round(float(np.mean(v)), 1), "max": round(float(np.max(v)), 1)}
                    for k, v in sorted(s.pop("by_natoms").items(), key=lambda kv: int(kv[0]))}
            return out

        entries = self.entries.read().to_pylist() if self.entries.exists() else []
        cands = self.candidates.read().to_pylist() if self.candidates.exists() else []
        manifest = {
            "generated_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "command": "python -m pipeline.sources.demo_set",
            "system": "Li-Al",
            "fidelities": {name: {"run_type": f.run_type, "settings": dict(f.settings),
                                  "settings_hash": f.settings_hash} for name, f in fids.items()},
            "software": dict(next(iter(fids.values())).software),
            "counts": {
                "frames": len(frames), "test_frames": len(test), "entries": len(entries), "candidates": len(cands),
                "rejects": self.rejects.read().num_rows if self.rejects.exists() else 0,
            },
            "frames": summary(frames),
            "test_frames": summary(test),
            "entries": {r["entry_id"]: {"energy_per_atom": r["energy_per_atom"], "formula": r["formula"],
                                        **{k: json.loads(r["data"]).get(k) for k in ("relax_steps", "relax_seconds")}}
                        for r in entries + cands},
            "hull": hull_summary(entries, cands),
        }
        write_json_atomic(self.out / "manifest.json", manifest, sort_keys=True)
        return manifest


def hull_summary(entries: list[dict[str, Any]], candidates: list[dict[str, Any]]) -> dict[str, Any]:
    """Formation energy and energy above the reference hull (eV/atom) of every entry, per fidelity."""
    from pymatgen.analysis.phase_diagram import PhaseDiagram

    out: dict[str, Any] = {}
    for fidelity in (PBE, R2SCAN):
        refs = [row_to_entry(r) for r in entries if r["fidelity"] == fidelity]
        elements = {str(el) for e in refs if len(e.composition) == 1 for el in e.composition}
        if elements != {"Li", "Al"}:
            continue
        pd = PhaseDiagram(refs)
        out[fidelity] = {
            e.entry_id: {"formation_energy_per_atom": round(pd.get_form_energy_per_atom(e), 4),
                         "e_above_hull": round(pd.get_e_above_hull(e, allow_negative=True), 4)}
            for e in refs + [row_to_entry(r) for r in candidates if r["fidelity"] == fidelity]
        }
    return out


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
    demo.write_manifest()
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
