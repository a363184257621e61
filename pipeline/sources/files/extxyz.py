"""Extended XYZ frames (MPtrj, Alexandria and other labelled sets) -> frame rows.

Parsing is ASE's extxyz reader, frame by frame: the file is cut at the atom-count lines first, so one
malformed frame becomes a reject and the frames after it still import.

Recognised sets (``source`` key of the frame's info line, as written by the mattersim benchmark files):

* ``source=MPtrj``: Materials Project relaxation steps (VASP PBE / PBE+U, MP input sets) -> fidelity ``pbe``.
  ``mptrj_snapshot_id`` (``<task_id>-<calc_id>-<ionic_step>``) gives ``frame_id = mptrj:<snapshot id>``,
  task id and ionic step; ``mptrj_traj_id`` is the material id. MPtrj does not record GGA vs GGA+U per frame:
  ``run_type`` follows MP's own rule (:func:`pipeline.sources.files.atoms_frames.mp_run_type`).
* ``source=Alexandria``: Alexandria PBE frames -> fidelity ``alexandria-pbe``. Alexandria is a separate
  database computed with its own workflow: MP-compatible PBE(+U) parameters, but not MP's exact runs (code
  versions, k-point meshes, relaxation protocol), so its total energies are not guaranteed to sit on MP's
  GGA scale. A separate fidelity name keeps them from being mixed with ``pbe`` energies unless a model or a
  fitted shift says they may be. ``alexandria_id`` is the material id; ``frame_id = alexandria:<id>``.
* Anything else needs ``fidelity=`` from the caller; the frame id is then a content hash unless the frame
  carries ``frame_id`` in its info.

Energies are the raw, uncorrected VASP totals (``energy=`` in the info line; MPtrj's ``corrected_total_energy``
is not used).

Stress sign -- evidence that the mattersim files already use the ASE convention (eV/A^3, tensile positive),
so no conversion is applied (``flip_stress=True`` exists for files that do not):

1. Model check, measured with SevenNet-0 (an ASE calculator whose stress is the strain derivative of its own
   energy, hence ASE sign by construction) on the first 120 frames with <= 40 atoms of each file
   (``benchmarks/bench_import.py --stress-evidence`` reproduces it): ``mptrj-random-1k``: correlation of all
   9 stress components with the model 0.983, least-squares slope of the label pressure on the model pressure
   0.98, same sign in 30/30 frames with |pressure| > 0.006 eV/A^3; ``mptrj-highest-stress-1k``: slope 1.01,
   same sign in 106/120 (correlation of components 0.46: these are outliers, see below).
   Flipping the sign would give correlation -0.98. ``alexandria-random-1k`` is almost stress-free (5-95 %
   pressure range -0.002 .. 0.004 eV/A^3, below the model's error); on its 26 frames with
   |pressure| > 0.006 eV/A^3 the pressure correlates +0.59 with the model (17/26 same sign): weaker, but
   it points the same way, and the file comes from the same writer with the same ``stress_unit`` key.
2. Physics check (:mod:`pipeline.sources.files.stress_check`, tested in ``tests/test_sources_extxyz.py``): on the
   10 pairs of consecutive ionic steps in ``mptrj-highest-stress-1k`` the energy change is better explained
   with the stress as labelled than flipped in 9 of 10 (median errors 4.4 vs 6.3 eV; these frames are far
   from equilibrium, so the first-order balance is rough). The same check on the orb-models MPtrj ASE db
   (:mod:`pipeline.sources.files.asedb`) gives median errors 0.0004 eV as labelled vs 0.038 eV flipped.

Observed, not fixed: in ``mptrj-highest-stress-1k`` the stress magnitudes of some relaxations (e.g.
mp-675106, mp-675893) overstate the energy change along the trajectory by 4-10x (pressure ~0.8 eV/A^3 =
130 GPa). Treat that file as robustness input, not as training labels of record.
"""

from __future__ import annotations

import collections
import gzip
import io
import itertools
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import ase.io
import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from pipeline.frames import RecordError
from pipeline.sources.base import ImportResult, collect
from pipeline.sources.common import failed_file
from pipeline.sources.files.atoms_frames import (
    check_units,
    content_frame_id,
    labelled_atoms_row,
    mptrj_fields,
    scalar_meta,
)

SOURCE = "extxyz"

#: info["source"] -> (frames.source, fidelity)
KNOWN_SETS = {
    "mptrj": ("mptrj-extxyz", "pbe"),
    "alexandria": ("alexandria-extxyz", "alexandria-pbe"),
}

#: info keys that become schema fields (or were checked) and are not repeated in ``meta``
_USED_INFO = (
    "mptrj_traj_id",
    "mptrj_snapshot_id",
    "alexandria_id",
    "frame_id",
    "source",
    "energy_unit",
    "forces_unit",
    "stress_unit",
)


class _Lines:
    """Line iterator with look-ahead (for frame headers) and a line counter."""

    def __init__(self, lines: Iterable[str]):
        self._it = iter(lines)
        self._ahead: collections.deque[str] = collections.deque()
        self.line_no = 0

    def peek(self, k: int = 0) -> str | None:
        while len(self._ahead) <= k:
            line = next(self._it, None)
            if line is None:
                return None
            self._ahead.append(line if line.endswith("\n") else line + "\n")
        return self._ahead[k]

    def pop(self) -> str | None:
        line = self.peek()
        if line is not None:
            self._ahead.popleft()
            self.line_no += 1
        return line

    def at_header(self) -> bool:
        """Next lines are an atom count and an extxyz comment line (``Lattice=`` or ``Properties=``)."""
        head, comment = self.peek(), self.peek(1)
        return bool(
            head is not None
            and head.strip().isdigit()
            and comment is not None
            and ("Lattice=" in comment or "Properties=" in comment)
        )

    def skip_to_header(self) -> None:
        while self.peek() is not None and not self.at_header():
            self.pop()


def split_frames(lines: Iterable[str]) -> Iterator[tuple[int, str | Exception]]:
    """(frame index, text of one frame) for each frame of (ext)xyz lines; a broken frame yields an error.

    Streams: ``lines`` may be an open file. After a broken frame the reader skips ahead to the next frame
    header (a bare integer followed by an extxyz comment line).
    """
    src = _Lines(lines)
    index = 0
    while (line := src.peek()) is not None:
        if not line.strip():
            src.pop()
            continue
        start = src.line_no + 1
        head = src.pop() or ""
        if not head.strip().isdigit():
            yield index, RecordError(f"line {start}: expected an atom count, got {head.strip()[:40]!r}")
            index += 1
            src.skip_to_header()
            continue
        n = int(head)
        comment = src.pop()
        body: list[str] = []
        while len(body) < n and (nxt := src.peek()) is not None and nxt.strip() and not src.at_header():
            body.append(src.pop() or "")
        if comment is None or len(body) < n:
            yield (
                index,
                RecordError(f"line {start}: frame announces {n} atoms but has {len(body)} atom lines"),
            )
            index += 1
            src.skip_to_header()
            continue
        yield index, "".join([head, comment, *body])
        index += 1


def _read_frame(text: str) -> Atoms:
    try:
        return ase.io.read(io.StringIO(text), format="extxyz")
    except Exception as exc:  # ASE raises several types for malformed frames
        raise RecordError(f"unparseable extxyz frame: {exc}") from exc


def _check_label_keys(label_keys: Mapping[str, str]) -> None:
    unknown = set(label_keys) - {"energy", "forces", "stress"}
    if unknown:
        raise ValueError(f"label_keys may name energy, forces and stress, not {sorted(unknown)}")


def relabel(atoms: Atoms, label_keys: Mapping[str, str]) -> Atoms:
    """Move labels stored under other names (e.g. ``{"energy": "REF_energy", "forces": "REF_forces",
    "stress": "REF_stress"}``, as MACE-style training files have them) onto a SinglePointCalculator."""
    _check_label_keys(label_keys)
    results: dict[str, Any] = dict(atoms.calc.results) if atoms.calc is not None else {}
    for label, key in label_keys.items():
        store = atoms.arrays if label == "forces" else atoms.info
        if key in store:
            value = np.asarray(store.pop(key), dtype=float)
            results[label] = value.reshape(3, 3) if label == "stress" and value.size == 9 else value
    atoms.calc = SinglePointCalculator(atoms, **results) if results else None
    return atoms


def atoms_to_row(
    atoms: Atoms,
    *,
    fidelity: str | None = None,
    flip_stress: bool = False,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One labelled extxyz frame -> schema row (see the module doc for ids and fidelities)."""
    info = dict(atoms.info)
    check_units(info)
    set_name = str(info.get("source", "")).strip().lower()
    source, default_fidelity = KNOWN_SETS.get(set_name, (SOURCE, None))
    fields: dict[str, Any] = {}
    meta = dict(meta or {})
    if set_name == "mptrj":
        if "mptrj_snapshot_id" not in info:
            raise RecordError("MPtrj frame without mptrj_snapshot_id")
        fields, extra = mptrj_fields(info["mptrj_snapshot_id"], info.get("mptrj_traj_id"), atoms.numbers)
        meta.update(extra)
    elif set_name == "alexandria":
        if "alexandria_id" not in info:
            raise RecordError("Alexandria frame without alexandria_id")
        alex_id = str(info["alexandria_id"])
        fields = {"frame_id": f"alexandria:{alex_id}", "material_id": alex_id}
    fidelity = fidelity or default_fidelity
    if fidelity is None:
        raise RecordError(f"fidelity unknown for source {info.get('source')!r}: pass fidelity=...")
    energy = atoms.calc.results.get("energy") if atoms.calc is not None else None
    if "frame_id" not in fields:
        fields["frame_id"] = (
            str(info["frame_id"]) if "frame_id" in info else content_frame_id(source, atoms, energy)
        )
    meta = {**scalar_meta(info, skip=_USED_INFO), **meta}
    return labelled_atoms_row(
        atoms, flip_stress=flip_stress, source=source, fidelity=fidelity, meta=meta, **fields
    )


def _open_text(path: Path) -> IO[str]:
    with open(path, "rb") as fh:
        gzipped = fh.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rt") if gzipped else open(path)


def iter_extxyz(
    path: str | Path,
    *,
    batch_size: int = 10_000,
    fidelity: str | None = None,
    flip_stress: bool = False,
    limit: int | None = None,
    label_keys: Mapping[str, str] | None = None,
) -> Iterator[ImportResult]:
    """Stream an extxyz file (plain or gzipped) as import results of at most ``batch_size`` frames each.

    Options as in :func:`import_extxyz`. An unreadable file, or one that breaks off mid-way, adds one reject
    naming the file.
    """
    if label_keys:
        _check_label_keys(label_keys)
    path = Path(path)
    try:
        fh = _open_text(path)
    except OSError as exc:
        yield failed_file(SOURCE, path, "extxyz file", exc)
        return

    def records() -> Iterator[tuple[str, str | Exception]]:
        try:
            for index, chunk in split_frames(fh):
                if limit is not None and index >= limit:
                    return
                yield f"{path.name}:{index}", chunk
        except (OSError, UnicodeDecodeError, EOFError) as exc:
            yield path.name, RecordError(f"unreadable extxyz file: {type(exc).__name__}: {exc}")

    def convert(record_id: str, chunk: str | Exception) -> list[dict[str, Any]]:
        if isinstance(chunk, Exception):
            raise chunk
        index = int(record_id.rsplit(":", 1)[1])
        atoms = _read_frame(chunk)
        if label_keys:
            relabel(atoms, label_keys)
        meta = {"file": path.name, "index": index}
        return [atoms_to_row(atoms, fidelity=fidelity, flip_stress=flip_stress, meta=meta)]

    with fh:
        stream = records()
        while batch := list(itertools.islice(stream, batch_size)):
            yield collect(SOURCE, batch, convert)


def import_extxyz(
    path: str | Path,
    *,
    fidelity: str | None = None,
    flip_stress: bool = False,
    limit: int | None = None,
    label_keys: Mapping[str, str] | None = None,
) -> ImportResult:
    """Frame rows of every frame of an extxyz file, plain or gzipped (``limit``: the first frames only).

    ``fidelity`` overrides the fidelity of recognised sets and is required for others; ``flip_stress`` for
    files whose stress uses the VASP sign (compressive positive, still in eV/A^3); ``label_keys`` for files
    whose labels have other names (see :func:`relabel`). For files too large to hold in memory, stream with
    :func:`iter_extxyz` (or :func:`pipeline.sources.files.import_to_dataset`).
    """
    result = ImportResult(SOURCE)
    options = {"fidelity": fidelity, "flip_stress": flip_stress, "limit": limit, "label_keys": label_keys}
    for part in iter_extxyz(path, batch_size=1 << 62, **options):
        result.extend(part)
    return result
