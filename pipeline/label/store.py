"""Label structures into a dataset folder: frames + entries with provenance, resumable, idempotent.

:class:`LabelStore` wraps :class:`pipeline.label.dft.Labeller` (one calculator factory per fidelity: GPAW built
in, or any ASE calculator through :func:`ase_fidelity`, e.g. VASP on a cluster or EMT in the tests) and a folder

    ROOT/frames/    FRAMES_SCHEMA  key frame_id  = '<source>:<structure hash>:<fidelity>'
    ROOT/entries/   ENTRIES_SCHEMA key entry_id  = '<source>-<structure hash>-<fidelity>', thermo_type 'raw'
    ROOT/rejects/   REJECTS_SCHEMA               failed calculations with their one-line error

Every calculation is appended as soon as it finishes (a killed batch keeps what it did), and a structure whose
hash is already stored or rejected at that fidelity is skipped: re-running the same batch computes nothing.
Provenance in ``meta`` (frames) and ``parameters``/``data`` (entries): code (calculator class, software
versions), settings and their hash, wall time, the caller's name for the structure and its hash.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import pyarrow as pa
from ase import Atoms
from ase.calculators.calculator import Calculator
from pymatgen.core import Structure
from pymatgen.entries.computed_entries import ComputedStructureEntry
from pymatgen.io.ase import AseAtomsAdaptor

from pipeline.entries import entry_to_row
from pipeline.frames import frames_table
from pipeline.hashing import config_hash, structure_hash
from pipeline.io.parquet import ParquetDataset
from pipeline.label.dft import Fidelity, Labeller
from pipeline.schema import ENTRIES_SCHEMA, FRAMES_SCHEMA, REJECTS_SCHEMA


def ase_fidelity(name: str, factory: Callable[[Atoms], Calculator], *, run_type: str | None = None,
                 settings: Mapping[str, Any] | None = None) -> Fidelity:
    """A fidelity computed by any ASE calculator; provenance records the calculator class and versions.

    ``settings``: everything that changes the energy scale (written to every frame and hashed)."""
    probe = factory(Atoms("H", cell=[5, 5, 5], pbc=True))
    cls = type(probe)
    software = {"calculator": f"{cls.__module__}.{cls.__qualname__}"}
    for pkg in ("ase", cls.__module__.split(".")[0]):
        try:
            software[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    s = {"calculator": cls.__name__, **dict(settings or {})}
    return Fidelity(name=name, factory=factory, run_type=run_type, settings=s, settings_hash=config_hash(s)[:12],
                    software=software)


def _atoms(obj: Atoms | Structure, name: str) -> Atoms:
    if isinstance(obj, Atoms):
        return obj.copy()
    if isinstance(obj, Structure):
        return AseAtomsAdaptor.get_atoms(obj)
    raise TypeError(f"{name}: expected ASE Atoms or a pymatgen Structure, got {type(obj).__name__}")


@dataclass
class LabelResult:
    """Per structure name: the stored (or already stored) frame row, or the one-line error."""

    rows: dict[str, dict[str, Any]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    computed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"label: {len(self.computed)} computed, {len(self.skipped)} already stored, "
                f"{len(self.errors)} failed")


class LabelStore:
    """Frames, entries and rejects of labelled structures under ``root`` (see module doc)."""

    def __init__(self, root: str | Path, source: str = "label"):
        self.root = Path(root)
        self.source = source
        self.frames = ParquetDataset(self.root / "frames", FRAMES_SCHEMA, key=("frame_id",))
        self.entries = ParquetDataset(self.root / "entries", ENTRIES_SCHEMA, key=("entry_id", "thermo_type"))
        self.rejects = ParquetDataset(self.root / "rejects", REJECTS_SCHEMA, key=("record_id", "source"))

    def frame_id(self, digest: str, fidelity: str) -> str:
        return f"{self.source}:{digest}:{fidelity}"

    def _stored(self, frame_id: str) -> dict[str, Any] | None:
        if not self.frames.exists():
            return None
        import pyarrow.compute as pc

        t = self.frames.read(filter_expr=pc.field("frame_id") == frame_id)
        return t.to_pylist()[0] if t.num_rows else None

    def _rejected(self) -> dict[str, str]:
        if not self.rejects.exists():
            return {}
        return {r["record_id"]: r["error"] for r in self.rejects.read().to_pylist()}

    def label(self, labeller: Labeller, structures: Mapping[str, Atoms | Structure], fidelity: str,
              retry_failed: bool = False) -> LabelResult:
        """Single points of ``structures`` ({name: Atoms | Structure}) at ``fidelity``; one failure never stops
        the batch. Already stored structures are returned without a calculation; earlier failures are skipped
        (their error returned) unless ``retry_failed``."""
        fid = labeller.fidelity(fidelity)
        result = LabelResult()
        stored = self.frames.keys() if self.frames.exists() else set()
        rejected = self._rejected()
        for name, obj in structures.items():
            try:
                atoms = _atoms(obj, name)
                digest = structure_hash(atoms.numbers, atoms.positions, atoms.cell.array, atoms.pbc)
            except Exception as exc:  # noqa: BLE001 - a bad item is a failed item
                result.errors[name] = f"{name}: unusable structure: {exc}"
                continue
            frame_id = self.frame_id(digest, fid.name)
            if frame_id in stored:
                result.rows[name] = self._stored(frame_id)
                result.skipped.append(name)
                continue
            if frame_id in rejected and not retry_failed:
                result.errors[name] = f"{name}: {rejected[frame_id]} (stored failure; retry_failed to rerun)"
                result.skipped.append(name)
                continue
            meta = {"name": name, "structure_hash": digest, "code": dict(fid.software) or {"labeller": self.source}}
            t0 = time.perf_counter()
            try:
                row = labeller.label(atoms, fid.name, frame_id, material_id=name, meta=meta)
            except Exception as exc:  # noqa: BLE001 - recorded, the batch carries on
                msg = f"{type(exc).__name__}: {exc}".splitlines()[0]
                self.rejects.append(pa.Table.from_pylist(
                    [{"record_id": frame_id, "source": f"{self.source}:{fid.name}", "error": f"{name}: {msg}"}],
                    schema=REJECTS_SCHEMA))
                result.errors[name] = f"{name}: {msg}"
                continue
            wall = time.perf_counter() - t0
            self.frames.append(frames_table([row]))
            self.entries.append(pa.Table.from_pylist([self._entry_row(row, atoms, fid, name, digest, wall)],
                                                     schema=ENTRIES_SCHEMA))
            result.rows[name] = row
            result.computed.append(name)
        return result

    def _entry_row(self, row: Mapping[str, Any], atoms: Atoms, fid: Fidelity, name: str, digest: str,
                   wall: float) -> dict[str, Any]:
        structure = AseAtomsAdaptor.get_structure(atoms)
        entry = ComputedStructureEntry(
            structure, float(row["energy"]), entry_id=f"{self.source}-{digest}-{fid.name}",
            parameters={"run_type": fid.run_type, "settings": dict(fid.settings), "settings_hash": fid.settings_hash,
                        "software": dict(fid.software)},
            data={"frame_id": row["frame_id"], "name": name, "structure_hash": digest, "wall_s": round(wall, 3)},
        )
        return entry_to_row(entry, source=self.source, thermo_type="raw", fidelity=fid.name, material_id=name,
                            meta={"kind": "single point", "wall_s": round(wall, 3)})

    def counts(self) -> dict[str, int]:
        def n(ds: ParquetDataset) -> int:
            return ds.read().num_rows if ds.exists() else 0

        return {"frames": n(self.frames), "entries": n(self.entries), "rejects": n(self.rejects)}


def energies_of(result: LabelResult) -> dict[str, float]:
    """{name: energy per atom} of the labelled structures of a result."""
    return {k: float(r["energy"]) / len(r["numbers"]) for k, r in result.rows.items()}


def provenance(row: Mapping[str, Any]) -> dict[str, Any]:
    """The provenance JSON of a stored frame row."""
    return json.loads(row["meta"]) if row.get("meta") else {}

