"""Generate the Si-Sn multi-fidelity set (GPAW PBE + r2SCAN) under ``data/sisn``: covalent AND metallic
polymorphs, so that r2SCAN - PBE depends on the structure, not only on the element.

    python -m pipeline.label.sisn_set [--out data/sisn] [--stop-at 00:10] [--max-structures 400]

Why Si-Sn: both elements have a covalent diamond phase (Si; alpha-Sn) and metallic dense phases (beta-Sn, simple
hexagonal, bcc/fcc/hcp), and Sn's alpha/beta transition sits within a few 10 meV/atom, where functionals disagree.
A per-element r2SCAN - PBE shift cannot describe such a set; a model has to learn how the gap depends on bonding.

Work order (resumable: every frame / entry already stored or rejected is skipped on a re-run; ``--stop-at``
starts no new calculation after that UTC time):

1. the elements' ground-state prototypes Si-diamond and Sn-diamond (alpha), each relaxed at PBE and then, from
   the PBE structure, at r2SCAN -> ``entries/`` + ionic steps in ``frames/`` (so a hull exists early).
2. structures ``0 .. BLOCKS[0]-1`` (see :func:`structure`), each at PBE then r2SCAN (fidelities interleaved
   per structure, so whatever exists at the deadline has both labels); both held-out prototypes are among them.
3. the other references Sn-betaSn and SiSn-B3, then structures up to ``BLOCKS[1]-1``.
4. ``polymorphs``: the other training-prototype phases (-> ``entries/``) and the held-out prototypes' phases
   (-> ``candidates/``, their ionic steps NOT in ``frames/``), both fidelities.
5. the remaining structures up to ``--max-structures``.

Structures of the held-out prototypes (``HELD_OUT``: hexagonal diamond and simple hexagonal, one covalent, one
metallic) go to ``test_frames/`` and never to ``frames/``: the test split holds out WHOLE prototypes.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from ase import Atoms
from ase.build import bulk
from ase.spacegroup import crystal

from pipeline.config import Settings
from pipeline.frames import frames_table
from pipeline.io import ParquetDataset, write_json_atomic, write_text_atomic
from pipeline.label.demo_set import (
    PBE,
    R2SCAN,
    DeadlineReached,
    DemoSet,
    Phase,
    _deadline,
    _strain,
)
from pipeline.label.dft import R2SCAN_XC, GpawSettings, Labeller, gpaw_fidelities
from pipeline.label.sisn_readme import gap_stats, readme

log = logging.getLogger("pipeline.label.sisn_set")

ELEMENTS = frozenset({"Si", "Sn"})
#: PBE equilibrium volume per atom of the diamond phase (A^3): Si a = 5.47 A, alpha-Sn a = 6.65 A.
DIAMOND_VOLUME = {"Si": 5.47**3 / 8, "Sn": 6.65**3 / 8}
SEED = 2026
BLOCKS = (9, 54)  # structures labelled before the reference / the polymorph relaxations (see the work order)
MAX_ATOMS = 8
#: PBE settings (r2SCAN: the same with the r2SCAN functional), = data/demo's. Convergence checks (``--convergence``,
#: README): at k-point density 3.0 the r2SCAN - PBE change of polymorph energies is converged to ~2 meV/atom,
#: the polymorph energies themselves are not for metallic Sn (~35 meV/atom vs 4.5); 300 eV: ~2 meV/atom.
PBE_SETTINGS = GpawSettings(ecut=300.0, kpoint_density=3.0)


@dataclass(frozen=True)
class Prototype:
    """A lattice + basis (one element on every site; decoration replaces them) and its volume per atom relative
    to the diamond phase of the same element (a first guess; strain and volume scans sample around it)."""

    name: str
    build: Callable[[str], Atoms]
    volume_factor: float
    bonding: str  # covalent | metallic
    held_out: bool = False


def _diamond(el: str) -> Atoms:
    return bulk(el, "diamond", a=5.47)


def _hex_diamond(el: str) -> Atoms:
    # lonsdaleite (2H), P6_3/mmc (194), 4f (1/3, 2/3, 1/16), ideal c/a = sqrt(8/3): 4 atoms
    a = 3.87
    return crystal([el], basis=[(1 / 3, 2 / 3, 1 / 16)], spacegroup=194, cellpar=[a, a, a * (8 / 3) ** 0.5, 90, 90, 120])


def _beta_sn(el: str) -> Atoms:
    # A5, I4_1/amd (141, origin choice 1), 4a (0, 0, 0), c/a = 0.546 (Sn, 296 K): 2 atoms in the primitive cell
    a = 4.8
    return crystal([el], basis=[(0, 0, 0)], spacegroup=141, setting=1, cellpar=[a, a, 0.546 * a, 90, 90, 90],
                   primitive_cell=True)


def _simple_hex(el: str) -> Atoms:
    # A_f, P6/mmm, 1 atom, c/a = 0.94 (Si-V at ~16 GPa, Olijnyk et al. 1984)
    return Atoms(el, cell=[[2.6, 0, 0], [-1.3, 1.3 * 3**0.5, 0], [0, 0, 0.94 * 2.6]], pbc=True)


PROTOTYPES: dict[str, Prototype] = {p.name: p for p in (
    Prototype("diamond", _diamond, 1.0, "covalent"),
    Prototype("betaSn", _beta_sn, 0.78, "metallic"),
    Prototype("bcc", lambda el: bulk(el, "bcc", a=3.0), 0.74, "metallic"),
    Prototype("fcc", lambda el: bulk(el, "fcc", a=3.8), 0.74, "metallic"),
    Prototype("hcp", lambda el: bulk(el, "hcp", a=2.7, c=2.7 * (8 / 3) ** 0.5), 0.74, "metallic"),
    Prototype("hexdiamond", _hex_diamond, 1.0, "covalent", held_out=True),
    Prototype("sh", _simple_hex, 0.75, "metallic", held_out=True),
)}
HELD_OUT = tuple(n for n, p in PROTOTYPES.items() if p.held_out)
#: Order in which structures visit the prototypes (9 long, 2 held out = 22 % test). With the 4-long KINDS cycle
#: (coprime) every prototype x kind pair comes up once in 36 structures.
PROTOTYPE_CYCLE = ("diamond", "betaSn", "bcc", "hexdiamond", "fcc", "hcp", "diamond", "sh", "betaSn")
KINDS = ("strained", "rattled", "decorated", "rattled")


def at_volume(atoms: Atoms, factor: float) -> Atoms:
    """Scale ``atoms`` to ``factor`` x the (Vegard) sum of its elements' diamond volumes per atom."""
    target = factor * sum(DIAMOND_VOLUME[s] for s in atoms.get_chemical_symbols())
    atoms.set_cell(atoms.cell * (target / atoms.get_volume()) ** (1 / 3), scale_atoms=True)
    return atoms


def phase_atoms(prototype: str, symbols: str | list[str]) -> Atoms:
    """``prototype`` with ``symbols`` (one element, or one per site) at its guessed volume, as plain Atoms."""
    p = PROTOTYPES[prototype]
    built = p.build("Si")
    atoms = Atoms(numbers=built.numbers, positions=built.positions, cell=built.cell, pbc=True)
    atoms.set_chemical_symbols([symbols] * len(atoms) if isinstance(symbols, str) else list(symbols))
    return at_volume(atoms, p.volume_factor)


def _supercell(atoms: Atoms, rng: np.random.Generator, max_atoms: int) -> Atoms:
    """Repeat along random axes (shortest first when tied) while the cell stays <= ``max_atoms``."""
    out = atoms.copy()
    target = int(rng.choice([n for n in (2, 4, 8) if n <= max_atoms]))
    for axis in np.argsort(out.cell.lengths() + rng.uniform(0, 0.5, 3)):
        if len(out) * 2 <= target:
            reps = [1, 1, 1]
            reps[axis] = 2
            out = out.repeat(reps)
    return out


def structure(index: int, seed: int = SEED) -> tuple[str, Atoms, dict[str, Any]]:
    """The ``index``-th structure of the set: deterministic and independent of every other index (its own
    random stream), so a resumed or extended run regenerates the same ids and structures.

    Kinds: *strained* (primitive cell, one element, random symmetric strain up to 4 % on top of a volume change
    of -8..+8 %, rattled 0.02 A), *rattled* (supercell of 2-8 atoms, one element, strain up to 2 %, rattled
    0.05/0.1/0.15 A), *decorated* (supercell of 2-8 sites with random Si/Sn occupation at Vegard volume, strain
    up to 2 %, rattled 0.03 A).
    """
    rng = np.random.default_rng([seed, index])
    proto = PROTOTYPE_CYCLE[index % len(PROTOTYPE_CYCLE)]
    kind = KINDS[index % len(KINDS)]
    meta: dict[str, Any] = {"kind": kind, "prototype": proto, "bonding": PROTOTYPES[proto].bonding,
                            "held_out": PROTOTYPES[proto].held_out}
    if kind == "decorated":
        cell = _supercell(phase_atoms(proto, "Si"), rng, MAX_ATOMS)
        n = len(cell)
        n_sn = int(rng.integers(1, n)) if n > 1 else 1
        symbols = np.array(["Si"] * n, dtype=object)
        symbols[rng.choice(n, size=n_sn, replace=False)] = "Sn"
        atoms = cell.copy()
        atoms.set_chemical_symbols(list(symbols))
        atoms = _strain(at_volume(atoms, PROTOTYPES[proto].volume_factor), rng, 0.02)
        sigma = 0.03
    else:
        el = str(rng.choice(sorted(ELEMENTS)))
        base = phase_atoms(proto, el)
        if kind == "strained":
            base.set_cell(base.cell * float(rng.uniform(0.92, 1.08)) ** (1 / 3), scale_atoms=True)
            atoms = _strain(base, rng, 0.04)
            sigma = 0.02
        else:
            atoms = _strain(_supercell(base, rng, 4 if el == "Sn" else MAX_ATOMS), rng, 0.02)
            sigma = float(rng.choice([0.05, 0.1, 0.15]))
        meta["element"] = el
    atoms.rattle(sigma, seed=int(rng.integers(1 << 30)))
    meta["rattle_sigma"] = sigma
    return f"{kind}-{proto}-{atoms.get_chemical_formula()}-{index:04d}", atoms, meta


# ------------------------------------------------------------------------------------------------ phases

def first_structures(frames: pa.Table, n: int | None) -> pa.Table:
    """Frames of the generated structures with index < ``n`` (``meta["index"]``: :func:`structure`'s ``index``)
    plus every frame without one (the relaxed phases' ionic steps); ``n`` None: all.

    The set only grows (structure i comes from its own random stream, ids never shift), so for ``n`` past the
    relaxations (``BLOCKS``) this is the set exactly as it was when it had ``n`` structures: a table measured then
    is reproduced on the grown set (the same data hash); over several ``n`` it gives a learning curve. Except
    when a stop cut structure ``n - 1`` between its two fidelities: the grown set has both of its labels, so the
    old set (one label) is only in git history."""
    if n is None:
        return frames
    index = [json.loads(m or "{}").get("index") for m in frames.column("meta").to_pylist()]
    keep = [i is None or i < n for i in index]
    return frames.filter(pa.array(keep, pa.bool_()))


def _phase(prototype: str, symbols: str | list[str], name: str, source: str) -> Phase:
    return Phase(name, lambda: phase_atoms(prototype, symbols), source)


REFERENCE_PHASES: tuple[Phase, ...] = (
    _phase("diamond", "Si", "Si-diamond", "Si diamond (A4, Fd-3m), ground state"),
    _phase("diamond", "Sn", "Sn-diamond", "alpha-Sn, diamond (A4, Fd-3m), ground state below 13 C"),
    _phase("betaSn", "Sn", "Sn-betaSn", "beta-Sn (A5, I4_1/amd, c/a 0.546), ground state above 13 C"),
    _phase("diamond", ["Si", "Sn"], "SiSn-B3", "SiSn zincblende (B3, F-43m), hypothetical ordered alloy"),
)
#: More relaxed phases of the TRAINING prototypes (entries; relaxation frames in frames/).
POLYMORPH_PHASES: tuple[Phase, ...] = (
    _phase("betaSn", "Si", "Si-betaSn", "Si-II, beta-Sn type (A5), high-pressure phase"),
    _phase("bcc", "Si", "Si-bcc", "Si bcc (A2), hypothetical metal"),
    _phase("fcc", "Si", "Si-fcc", "Si fcc (A1), hypothetical metal"),
    _phase("bcc", "Sn", "Sn-bcc", "Sn bcc (A2), high-pressure phase"),
    _phase("fcc", "Sn", "Sn-fcc", "Sn fcc (A1), hypothetical metal"),
)
#: Relaxed phases of the HELD-OUT prototypes (candidates: E_hull truth; their frames never in frames/).
CANDIDATE_PHASES: tuple[Phase, ...] = (
    _phase("hexdiamond", "Si", "Si-hexdiamond", "Si lonsdaleite (2H, P6_3/mmc), metastable (Si-IV)"),
    _phase("hexdiamond", "Sn", "Sn-hexdiamond", "Sn lonsdaleite (2H), hypothetical"),
    _phase("sh", "Si", "Si-sh", "Si-V simple hexagonal (P6/mmm), high-pressure phase"),
    _phase("sh", "Sn", "Sn-sh", "Sn simple hexagonal (P6/mmm), high-pressure phase"),
)


# ------------------------------------------------------------------------------------------------ writer

class SiSnSet(DemoSet):
    """The folders of the Si-Sn set (same layout as ``data/demo``) and its interleaved, resumable work order."""

    prefix = "sisn"
    command = "python -m pipeline.label.sisn_set"
    system = "Si-Sn"
    elements = ELEMENTS

    def relax_each(self, phases: tuple[Phase, ...], dataset: ParquetDataset, kind: str) -> None:
        """Each phase at PBE, then at r2SCAN from the PBE structure, before the next phase."""
        for phase in phases:
            for fidelity in (PBE, R2SCAN):
                self._relax_all((phase,), dataset, kind, fidelity)

    def label_structures(self, start: int, stop: int, seed: int = SEED) -> None:
        """Structures ``start .. stop-1``, PBE then r2SCAN each; held-out prototypes into ``test_frames/``."""
        skip = self.frames.keys() | self.test_frames.keys() | self._rejected()
        for i in range(start, stop):
            sid, atoms, meta = structure(i, seed)
            target = self.test_frames if meta["held_out"] else self.frames
            for fidelity in (PBE, R2SCAN):
                frame_id = f"gpaw:{sid}:{fidelity}"
                if not self._todo(frame_id, skip):
                    continue
                try:
                    row = self.labeller.label(atoms, fidelity, frame_id, material_id=f"sisn:{sid}",
                                              meta={**meta, "test": meta["held_out"], "index": i})
                except Exception as exc:  # noqa: BLE001 - recorded and skipped
                    self._reject(frame_id, exc)
                    continue
                target.append(frames_table([row]))
                log.info("%s: %d atoms, %.1f s", frame_id, len(atoms), json.loads(row["meta"])["seconds"])

    def manifest_extra(self, manifest: dict[str, Any], frames: list[dict[str, Any]],
                       test: list[dict[str, Any]]) -> None:
        """Held-out prototypes, structures with both labels, counts by prototype, r2SCAN - PBE statistics and the
        convergence checks."""

        def both(rows: list[dict[str, Any]]) -> int:
            by_id: dict[str, set[str]] = {}
            for r in rows:
                by_id.setdefault(r["frame_id"].rsplit(":", 1)[0], set()).add(r["fidelity"])
            return sum(1 for f in by_id.values() if f == {PBE, R2SCAN})

        def by_prototype(rows: list[dict[str, Any]]) -> dict[str, int]:
            out: dict[str, int] = {}
            for r in rows:
                m = json.loads(r["meta"])
                if "prototype" in m and r["fidelity"] == PBE:
                    out[m["prototype"]] = out.get(m["prototype"], 0) + 1
            return dict(sorted(out.items()))

        manifest["held_out_prototypes"] = list(HELD_OUT)
        manifest["counts"]["structures_with_both_fidelities"] = {"frames": both(frames), "test_frames": both(test)}
        manifest["counts"]["structures_by_prototype"] = {"frames": by_prototype(frames),
                                                         "test_frames": by_prototype(test)}
        manifest["gap"] = gap_stats(frames + test)
        conv = self.out / "convergence.json"
        if conv.is_file():
            manifest["convergence"] = json.loads(conv.read_text())


# ------------------------------------------------------------------------------------------- convergence

#: (functional, cutoff eV, k-point density 1/A), in the order they are computed (most informative first).
CONVERGENCE_GRID = (("PBE", 300, 3.0), ("PBE", 400, 3.0), ("r2SCAN", 300, 3.0), ("r2SCAN", 400, 3.0),
                    ("PBE", 300, 4.5), ("r2SCAN", 300, 4.5), ("PBE", 300, 6.0))


def convergence(out: Path, deadline: float | None = None) -> dict[str, Any]:
    """Polymorph energy differences (meV/atom) vs plane-wave cutoff (eV) and k-point density (1/A), at fixed
    guessed geometries: Si betaSn - diamond and Sn betaSn - diamond, at both functionals (their r2SCAN - PBE
    change is what a multi-fidelity model has to learn). Each grid point is appended to
    ``<out>/convergence.json`` as soon as it exists; a re-run skips the points already there (resumable)."""
    structures = {"Si-diamond": phase_atoms("diamond", "Si"), "Si-betaSn": phase_atoms("betaSn", "Si"),
                  "Sn-diamond": phase_atoms("diamond", "Sn"), "Sn-betaSn": phase_atoms("betaSn", "Sn")}
    pairs = {"Si betaSn-diamond": ("Si-betaSn", "Si-diamond"), "Sn betaSn-diamond": ("Sn-betaSn", "Sn-diamond")}
    path = out / "convergence.json"
    result = json.loads(path.read_text()) if path.is_file() else {
        "what": "energy differences in meV/atom at fixed (unrelaxed) geometries", "rows": []}
    done = {(r["xc"], r["ecut"], r["kpoint_density"]) for r in result["rows"]}
    out.mkdir(parents=True, exist_ok=True)
    for xc, ecut, kd in CONVERGENCE_GRID:
        if (xc, ecut, kd) in done:
            continue
        if deadline is not None and time.time() > deadline:
            break
        s = GpawSettings(xc="PBE" if xc == "PBE" else R2SCAN_XC, ecut=ecut, kpoint_density=kd)
        e, secs = {}, 0.0
        for name, atoms in structures.items():
            work = atoms.copy()
            work.calc = s.calculator(work)
            t0 = time.perf_counter()
            e[name] = work.get_potential_energy() / len(work)
            secs += time.perf_counter() - t0
        row = {"xc": xc, "ecut": ecut, "kpoint_density": kd, "seconds": round(secs, 1),
               **{k: round(1000 * float(e[a] - e[b]), 1) for k, (a, b) in pairs.items()}}
        log.info("convergence %s", row)
        result["rows"].append(row)
        write_json_atomic(path, result, sort_keys=True)
    return result


# ----------------------------------------------------------------------------------------------- driver

def run(out: Path, max_structures: int, deadline: float | None) -> SiSnSet:
    data = SiSnSet(out, Labeller(gpaw_fidelities(PBE_SETTINGS), source="gpaw"), deadline)
    try:
        data.relax_each(REFERENCE_PHASES[:2], data.entries, "reference")  # the elements' ground states first
        data.label_structures(0, min(BLOCKS[0], max_structures))
        data.relax_each(REFERENCE_PHASES[2:], data.entries, "reference")
        data.label_structures(0, min(BLOCKS[1], max_structures))
        data.relax_each(POLYMORPH_PHASES, data.entries, "reference")
        data.relax_each(CANDIDATE_PHASES, data.candidates, "candidate")
        data.label_structures(0, max_structures)
    except DeadlineReached as stop:
        log.info("deadline reached: stopping before %s", stop)
    data.compact()
    write_readme(data.out, data.write_manifest())
    return data


def write_readme(out: Path, manifest: dict[str, Any]) -> None:
    """README = the hand-written head + ``notes.md`` (hand-written findings, kept across re-runs) + tables
    computed from the manifest (:mod:`pipeline.label.sisn_readme`)."""
    notes = out / "notes.md"
    write_text_atomic(out / "README.md", readme(manifest, notes.read_text() if notes.is_file() else ""))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Settings().data_dir / "sisn")
    ap.add_argument("--max-structures", type=int, default=400)
    ap.add_argument("--stop-at", default=None, help="UTC HH:MM: start no new calculation after it")
    ap.add_argument("--convergence", action="store_true", help="run the cutoff / k-point checks and exit")
    ap.add_argument("--report-only", action="store_true",
                    help="compute nothing: compact the folders, rewrite manifest.json and README.md")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.convergence:
        convergence(args.out, _deadline(args.stop_at))
        return
    if args.report_only:
        data = SiSnSet(args.out, Labeller(gpaw_fidelities(PBE_SETTINGS), source="gpaw"))
        data.compact()
        write_readme(data.out, data.write_manifest())
        return
    run(args.out, args.max_structures, _deadline(args.stop_at))


if __name__ == "__main__":
    main()
