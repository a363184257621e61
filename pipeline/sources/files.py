"""Import any supported file (or folder) into the Parquet schema: detect its kind, run its importer, write rows.

``import_path(path, kind="auto", **options) -> ImportResult`` picks the importer; ``write_import(result,
out_dir)`` appends frame rows to ``out_dir/frames/``, entry rows to ``out_dir/entries/`` and rejects to
``out_dir/rejects/`` (each a :class:`pipeline.io.ParquetDataset` keyed as in :data:`pipeline.schema.KEYS`, so a
re-run adds nothing twice). ``import_to_dataset(path, out_dir)`` does both, streaming extxyz files and ASE
databases in batches (one Parquet part per batch) so that files larger than memory import too.

Rows are told apart by their key: a row with ``frame_id`` is a frame, one with ``entry_id`` an entry (an
importer such as MatPES returns both in one result). No type tag is stored in :class:`ImportResult`.

Kinds and their detection in ``auto`` mode:

==================  =====================================================  =======================================
kind                importer                                               detected from
==================  =====================================================  =======================================
``extxyz``          :func:`pipeline.sources.extxyz.import_extxyz`          ``.xyz`` / ``.extxyz`` (``.gz`` too)
``ase-db``          :func:`pipeline.sources.asedb.import_ase_db`           ``.db`` / ``.sqlite`` (SQLite header)
``res``             :func:`pipeline.sources.res.import_res`                ``.res``, a tar of them, a folder of them
``entries-json``    :func:`pipeline.sources.entries_json.import_entries_json`  JSON whose records have ``@class``
                                                                           ComputedEntry / ComputedStructureEntry
``matpes``          :func:`pipeline.sources.matpes.import_matpes`          JSON records with ``matpes_id``
``mp-element-refs`` :func:`pipeline.sources.matpes.import_mp_element_refs` JSON ``{el: {structure: [..],
                                                                           energy_per_atom: [..]}}``
``wbm``             :func:`pipeline.sources.wbm.import_wbm`                JSON records with ``structure``,
                                                                           ``energy`` and ``corrected_energy``
``task-docs``       ``pipeline.sources.taskdocs.import_task_docs``         JSON records with ``calcs_reversed``
``vasprun``         :func:`import_vasprun_path` (taskdocs' vasprun reader)  ``vasprun.xml(.gz)``, a VASP run folder
``vasp-bundle``     :func:`import_vasp_bundle` (idem)                      emmet JSON ``{file: {"0": hex}}``
==================  =====================================================  =======================================

JSON files may be gzip-compressed. A folder without ``.res`` or ``vasprun.xml`` files is imported file by file. A file whose kind
cannot be told, or that is missing, becomes one reject (the batch carries on).
"""

from __future__ import annotations

import importlib
import tarfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pipeline.entries import entries_table
from pipeline.frames import RecordError, frames_table
from pipeline.io import ParquetDataset
from pipeline.schema import ENTRIES_SCHEMA, FRAMES_SCHEMA, KEYS, REJECTS_SCHEMA
from pipeline.sources.base import ImportResult
from pipeline.sources.common import read_json

SOURCE = "files"

#: kind -> (module, function); modules are imported when first used
IMPORTERS: dict[str, tuple[str, str]] = {
    "extxyz": ("pipeline.sources.extxyz", "import_extxyz"),
    "ase-db": ("pipeline.sources.asedb", "import_ase_db"),
    "res": ("pipeline.sources.res", "import_res"),
    "entries-json": ("pipeline.sources.entries_json", "import_entries_json"),
    "matpes": ("pipeline.sources.matpes", "import_matpes"),
    "mp-element-refs": ("pipeline.sources.matpes", "import_mp_element_refs"),
    "task-docs": ("pipeline.sources.taskdocs", "import_task_docs"),
    "wbm": ("pipeline.sources.wbm", "import_wbm"),
    "vasprun": ("pipeline.sources.files", "import_vasprun_path"),
    "vasp-bundle": ("pipeline.sources.files", "import_vasp_bundle"),
}

ENTRY_CLASSES = {"ComputedEntry", "ComputedStructureEntry", "GibbsComputedStructureEntry"}
_SQLITE_MAGIC = b"SQLite format 3\x00"


def importer(kind: str) -> Callable[..., ImportResult]:
    """The import function of a kind (ImportError with the kind named if its module is absent)."""
    if kind not in IMPORTERS:
        raise ValueError(f"unknown kind {kind!r}; known: {sorted(IMPORTERS)}")
    module, name = IMPORTERS[kind]
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ImportError(f"importer for {kind!r} ({module}.{name}) is not available: {exc}") from exc


def _vasprun_in(folder: Path) -> Path | None:
    return next((p for p in sorted(folder.glob("vasprun.xml*")) if p.is_file()), None)


def import_vasprun_path(path: str | Path, task_id: str | None = None, **options: Any) -> ImportResult:
    """Frames of a ``vasprun.xml(.gz)`` (or of the one in a VASP run folder) via the task-document importer.

    ``task_id`` defaults to the name of the run folder (it becomes part of the frame ids).
    """
    path = Path(path)
    vasprun = _vasprun_in(path) if path.is_dir() else path
    folder = path if path.is_dir() else path.parent
    if vasprun is None:
        result = ImportResult(SOURCE)
        result.reject(path.name, RecordError("no vasprun.xml in the folder"))
        return result
    taskdocs = importlib.import_module("pipeline.sources.taskdocs")
    return taskdocs.import_vasprun(vasprun, task_id or folder.name, **options)


def import_vasp_bundle(path: str | Path, task_id: str | None = None, **options: Any) -> ImportResult:
    """Frames of the vasprun.xml inside an emmet hex-encoded raw-VASP bundle (JSON ``{name: {"0": hex}}``).

    ``task_id`` defaults to the file name without its ``.json(.gz)`` suffix.
    """
    path = Path(path)
    taskdocs = importlib.import_module("pipeline.sources.taskdocs")
    name = task_id or path.name.removesuffix(".gz").removesuffix(".json")
    try:
        files = taskdocs.decode_hex_gz_bundle(path)
        vasprun = files["vasprun.xml"]
    except Exception as exc:  # noqa: BLE001 - a broken bundle is one reject
        result = ImportResult(SOURCE)
        result.reject(
            path.name, RecordError(f"no readable vasprun.xml in the bundle: {type(exc).__name__}: {exc}")
        )
        return result
    return taskdocs.import_vasprun(vasprun, name, **options)


def _first_record(data: Any) -> Any:
    if isinstance(data, list):
        return data[0] if data else None
    if isinstance(data, Mapping):
        if "@class" in data or "calcs_reversed" in data or "matpes_id" in data:
            return data
        return next(iter(data.values()), None)
    return None


def json_kind(data: Any) -> str:
    """Kind of parsed JSON content, from the shape of its first record."""
    rec = _first_record(data)
    if not isinstance(rec, Mapping):
        raise RecordError("JSON holds no records of a known kind")
    if rec.get("@class") in ENTRY_CLASSES:
        return "entries-json"
    if "matpes_id" in rec:
        return "matpes"
    if "calcs_reversed" in rec:
        return "task-docs"
    if isinstance(rec.get("structure"), list) and isinstance(rec.get("energy_per_atom"), list):
        return "mp-element-refs"
    if {"structure", "energy", "corrected_energy"} <= set(rec):
        return "wbm"
    if rec and all(str(k).isdigit() and isinstance(v, str) for k, v in rec.items()):
        return "vasp-bundle"
    raise RecordError(f"JSON records with keys {sorted(rec)[:8]} are of no known kind")


def detect_kind(path: str | Path) -> str:
    """Kind of a file or folder (see the module doc); :class:`RecordError` when it cannot be told."""
    path = Path(path)
    if path.is_dir():
        if any(path.rglob("*.res")):
            return "res"
        if _vasprun_in(path) is not None:
            return "vasprun"
        raise RecordError(
            f"{path} is a folder without .res or vasprun.xml files (import its files one by one)"
        )
    if not path.is_file():
        raise RecordError(f"no such file: {path}")
    name = path.name.lower()
    if name.endswith((".xyz", ".extxyz", ".xyz.gz", ".extxyz.gz")):
        return "extxyz"
    if name.endswith(".res"):
        return "res"
    if name.startswith("vasprun") and name.endswith((".xml", ".xml.gz")):
        return "vasprun"
    with open(path, "rb") as fh:
        head = fh.read(len(_SQLITE_MAGIC))
    if head == _SQLITE_MAGIC:
        return "ase-db"
    if name.endswith(".tar") or (not name.endswith((".json", ".json.gz")) and tarfile.is_tarfile(path)):
        return "res"
    if name.endswith((".json", ".json.gz")):
        try:
            data = read_json(path)
        except Exception as exc:
            raise RecordError(f"unreadable JSON: {type(exc).__name__}: {exc}") from exc
        return json_kind(data)
    raise RecordError(f"cannot tell the kind of {path.name}; pass kind= one of {sorted(IMPORTERS)}")


def _loose_files(path: Path) -> list[Path] | None:
    """The files of a folder that is imported file by file (no .res set, no VASP run), else None."""
    if path.is_dir() and not any(path.rglob("*.res")) and _vasprun_in(path) is None:
        return sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    return None


def _detect_or_reject(path: Path) -> tuple[str | None, ImportResult | None]:
    """(kind, None), or (None, a result holding the path as a reject) when the kind cannot be told."""
    try:
        return detect_kind(path), None
    except RecordError as exc:
        result = ImportResult(SOURCE)
        result.reject(path.name, exc)
        return None, result


def import_path(path: str | Path, kind: str = "auto", **options: Any) -> ImportResult:
    """Import one file or folder; ``options`` go to the importer (e.g. ``fidelity``, ``limit``)."""
    path = Path(path)
    if kind != "auto":
        return importer(kind)(path, **options)
    children = _loose_files(path)
    if children is not None:
        result = ImportResult(SOURCE)
        for child in children:
            result.extend(import_path(child, **options))
        return result
    detected, rejected = _detect_or_reject(path)
    return rejected if detected is None else importer(detected)(path, **options)


def split_rows(result: ImportResult) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(frame rows, entry rows) of a result, told apart by their key columns."""
    frames, entries = [], []
    for row in result.rows:
        if "frame_id" in row:
            frames.append(row)
        elif "entry_id" in row:
            entries.append(row)
        else:
            raise ValueError(f"row with neither frame_id nor entry_id: keys {sorted(row)[:6]}")
    return frames, entries


COUNT_KEYS = (
    "frames_read",
    "entries_read",
    "rejects_read",
    "frames_written",
    "entries_written",
    "rejects_written",
)


def _add(totals: dict[str, int], counts: dict[str, int]) -> dict[str, int]:
    for key in COUNT_KEYS:
        totals[key] += counts[key]
    return totals


def write_import(result: ImportResult, out_dir: str | Path) -> dict[str, int]:
    """Append a result's frames, entries and rejects under ``out_dir``; counts read and newly written."""
    out = Path(out_dir)
    frames, entries = split_rows(result)
    counts = dict.fromkeys(COUNT_KEYS, 0)
    counts.update(frames_read=len(frames), entries_read=len(entries), rejects_read=result.n_rejected)
    if frames:
        counts["frames_written"] = ParquetDataset(out / "frames", FRAMES_SCHEMA, KEYS["frames"]).append(
            frames_table(frames)
        )
    if entries:
        counts["entries_written"] = ParquetDataset(out / "entries", ENTRIES_SCHEMA, KEYS["entries"]).append(
            entries_table(entries)
        )
    if result.rejects:
        counts["rejects_written"] = ParquetDataset(out / "rejects", REJECTS_SCHEMA, KEYS["rejects"]).append(
            result.rejects_table()
        )
    return counts


#: kinds that can be streamed in batches: kind -> (module, generator of ImportResults)
STREAMING: dict[str, tuple[str, str]] = {
    "extxyz": ("pipeline.sources.extxyz", "iter_extxyz"),
    "ase-db": ("pipeline.sources.asedb", "iter_ase_db"),
}


def import_to_dataset(
    path: str | Path, out_dir: str | Path, kind: str = "auto", batch_size: int = 10_000, **options: Any
) -> dict[str, int]:
    """Import ``path`` and append it under ``out_dir`` (as :func:`write_import`), streaming large extxyz files
    and ASE databases in batches of ``batch_size`` so that memory stays bounded; returns summed counts."""
    path = Path(path)
    if kind == "auto":
        children = _loose_files(path)
        if children is not None:
            totals = dict.fromkeys(COUNT_KEYS, 0)
            for child in children:
                _add(totals, import_to_dataset(child, out_dir, batch_size=batch_size, **options))
            return totals
        detected, rejected = _detect_or_reject(path)
        if detected is None:
            return write_import(rejected, out_dir)
        kind = detected
    if kind not in STREAMING:
        return write_import(import_path(path, kind=kind, **options), out_dir)
    module, name = STREAMING[kind]
    parts = getattr(importlib.import_module(module), name)(path, batch_size=batch_size, **options)
    totals = dict.fromkeys(COUNT_KEYS, 0)
    for part in parts:
        _add(totals, write_import(part, out_dir))
    return totals
