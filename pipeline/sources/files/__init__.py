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
``extxyz``          :func:`pipeline.sources.files.extxyz.import_extxyz`          ``.xyz`` / ``.extxyz`` (``.gz`` too)
``ase-db``          :func:`pipeline.sources.files.asedb.import_ase_db`           ``.db`` / ``.sqlite`` (SQLite header)
``res``             :func:`pipeline.sources.files.res.import_res`                ``.res``, a tar of them, a folder of them
``entries-json``    :func:`pipeline.sources.files.entries_json.import_entries_json`  JSON whose records have ``@class``
                                                                           ComputedEntry / ComputedStructureEntry
``matpes``          :func:`pipeline.sources.files.matpes.import_matpes`          JSON records with ``matpes_id``
``mp-element-refs`` :func:`pipeline.sources.files.matpes.import_mp_element_refs` JSON ``{el: {structure: [..],
                                                                           energy_per_atom: [..]}}``
``wbm``             :func:`pipeline.sources.files.wbm.import_wbm`                JSON records with ``structure``,
                                                                           ``energy`` and ``corrected_energy``
``task-docs``       ``pipeline.sources.mp.taskdocs.import_task_docs``         JSON records with ``calcs_reversed``
``vasprun``         :func:`import_vasprun_path` (taskdocs' vasprun reader)  ``vasprun.xml(.gz)``, a VASP run folder
``vasp-bundle``     :func:`import_vasp_bundle` (idem)                      emmet JSON ``{file: {"0": hex}}``
==================  =====================================================  =======================================

JSON files may be gzip-compressed. A folder is imported file by file, subfolders and dotfiles included (a
folder holding ``vasprun.xml`` is one VASP run). A file whose kind cannot be told, an empty file, or a missing
path becomes one reject (the batch carries on); reject ids carry the path as given, so ``a/x.xyz`` and
``b/x.xyz`` never collide. A record whose key is already stored with different content is a reject too
(``duplicate key ... with different content``); identical ones are skipped (a re-run). Options an importer does
not take are dropped (``limit`` is then applied to its records) and listed in the counts (``options_ignored``).
"""

from __future__ import annotations

import importlib
import inspect
import re
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from pipeline.entries import entries_table
from pipeline.frames import RecordError, frames_table
from pipeline.io import ParquetDataset
from pipeline.progress import progress
from pipeline.schema import ENTRIES_SCHEMA, FRAMES_SCHEMA, KEYS, REJECTS_SCHEMA
from pipeline.sources.base import ImportResult
from pipeline.sources.common import read_json

SOURCE = "files"

#: kind -> (module, function); modules are imported when first used
IMPORTERS: dict[str, tuple[str, str]] = {
    "extxyz": ("pipeline.sources.files.extxyz", "import_extxyz"),
    "ase-db": ("pipeline.sources.files.asedb", "import_ase_db"),
    "res": ("pipeline.sources.files.res", "import_res"),
    "entries-json": ("pipeline.sources.files.entries_json", "import_entries_json"),
    "matpes": ("pipeline.sources.files.matpes", "import_matpes"),
    "mp-element-refs": ("pipeline.sources.files.matpes", "import_mp_element_refs"),
    "task-docs": ("pipeline.sources.mp.taskdocs", "import_task_docs"),
    "wbm": ("pipeline.sources.files.wbm", "import_wbm"),
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
    taskdocs = importlib.import_module("pipeline.sources.mp.taskdocs")
    return taskdocs.import_vasprun(vasprun, task_id or folder.name, **options)


def import_vasp_bundle(path: str | Path, task_id: str | None = None, **options: Any) -> ImportResult:
    """Frames of the vasprun.xml inside an emmet hex-encoded raw-VASP bundle (JSON ``{name: {"0": hex}}``).

    ``task_id`` defaults to the file name without its ``.json(.gz)`` suffix.
    """
    path = Path(path)
    taskdocs = importlib.import_module("pipeline.sources.mp.taskdocs")
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
        if _vasprun_in(path) is not None:
            return "vasprun"
        raise RecordError(f"{path} is a folder without a vasprun.xml (import its files one by one)")
    if not path.is_file():
        raise RecordError(f"no such file: {path}")
    if path.stat().st_size == 0:
        raise RecordError("empty file")
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
    """Every file under a folder that is imported file by file (not a VASP run), else None. Subfolders and
    dotfiles are included: nothing is skipped without a trace (an unknown file becomes a reject)."""
    if path.is_dir() and _vasprun_in(path) is None:
        return sorted(p for p in path.rglob("*") if p.is_file())
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
        return _run_importer(kind, path, options)[0]
    children = _loose_files(path)
    if children is not None:
        result = ImportResult(SOURCE)
        for child in children:
            result.extend(_qualify(import_path(child, **options), child))
        return result
    detected, rejected = _detect_or_reject(path)
    return rejected if detected is None else _run_importer(detected, path, options)[0]


def _run_importer(kind: str, path: Path, options: Mapping[str, Any]) -> tuple[ImportResult, list[str]]:
    """(result, names of options the importer does not take); ``limit`` is then applied to its rows."""
    fn = importer(kind)
    params = inspect.signature(fn).parameters
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    ignored = sorted(k for k in options if not takes_all and k not in params)
    result = fn(path, **{k: v for k, v in options.items() if k not in ignored})
    if "limit" in ignored and options["limit"] is not None:
        result.rows = result.rows[: int(options["limit"])]
        ignored.remove("limit")
    return result, ignored


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
    "files",
    "frames_read",
    "entries_read",
    "rejects_read",
    "frames_written",
    "entries_written",
    "rejects_written",
    "already_stored",
    "conflicts",
)


def _zero() -> dict[str, Any]:
    return {**dict.fromkeys(COUNT_KEYS, 0), "rejected_by_reason": Counter(), "options_ignored": set()}


def _add(totals: dict[str, Any], counts: Mapping[str, Any]) -> dict[str, Any]:
    for key in COUNT_KEYS:
        totals[key] += counts.get(key, 0)
    totals["rejected_by_reason"].update(counts.get("rejected_by_reason", {}))
    totals["options_ignored"].update(counts.get("options_ignored", ()))
    return totals


def _plain(counts: dict[str, Any]) -> dict[str, Any]:
    """Counts as JSON-able values (for the CLI and Prefect results)."""
    return {**counts, "rejected_by_reason": dict(counts["rejected_by_reason"]),
            "options_ignored": sorted(counts["options_ignored"])}


def reject_reason(error: str) -> str:
    """A short category of a reject message ('RecordError: unreadable extxyz file: ...' -> 'unreadable extxyz
    file'), for the per-run summary."""
    parts = error.split(": ")
    if len(parts) > 1 and parts[0].isidentifier():  # the exception type
        parts = parts[1:]
    while len(parts) > 1 and re.fullmatch(r"(line|frame|item|block|record) \S+", parts[0]):
        parts = parts[1:]  # where, not why
    head = parts[0].split(" (")[0].split(";")[0].strip()
    return head[:60] or "unknown"


def _qualify(result: ImportResult, path: Path) -> ImportResult:
    """Reject ids carrying the path as given ('b/x.xyz:3', not 'x.xyz:3'), so files of one name never collide."""
    name, full = path.name, str(path)
    for rej in result.rejects:
        rid = rej["record_id"]
        if rid == full or rid.startswith(full + ":"):
            continue
        rej["record_id"] = full + rid[len(name):] if rid.startswith(name) else f"{full}:{rid}"
    return result


def _append(dataset: ParquetDataset, rows: list[dict[str, Any]], what: str, result: ImportResult,
            counts: dict[str, Any], origins: Mapping[int, str]) -> None:
    table = frames_table(rows) if what == "frames" else entries_table(rows)
    written, conflicts = dataset.append_checked(table)
    counts[f"{what}_written"] = written
    counts["conflicts"] += len(conflicts)
    where = {"/".join(str(r[c]) for c in dataset.key): origins.get(id(r)) for r in rows}
    for key in conflicts:
        origin = where.get(key)
        result.reject(f"{origin}:{key}" if origin else key,
                      RecordError(f"duplicate key {key} with different content (the first stored is kept)"))


def write_import(result: ImportResult, out_dir: str | Path,
                 origins: Mapping[int, str] | None = None) -> dict[str, Any]:
    """Append a result's frames, entries and rejects under ``out_dir``; counts read and newly written.

    A row whose key is stored (or earlier in the result) with different content becomes a reject, named
    ``<file>:<key>`` when ``origins`` ({id(row): file}) says where the row came from."""
    out = Path(out_dir)
    origins = origins or {}
    frames, entries = split_rows(result)
    counts = _zero()
    counts.update(frames_read=len(frames), entries_read=len(entries))
    if frames:
        _append(ParquetDataset(out / "frames", FRAMES_SCHEMA, KEYS["frames"]), frames, "frames", result, counts,
                origins)
    if entries:
        _append(ParquetDataset(out / "entries", ENTRIES_SCHEMA, KEYS["entries"]), entries, "entries", result,
                counts, origins)
    counts["rejects_read"] = result.n_rejected
    counts["already_stored"] = (counts["frames_read"] + counts["entries_read"] - counts["frames_written"]
                                - counts["entries_written"] - counts["conflicts"])
    counts["rejected_by_reason"].update(reject_reason(r["error"]) for r in result.rejects)
    if result.rejects:
        counts["rejects_written"] = ParquetDataset(out / "rejects", REJECTS_SCHEMA, KEYS["rejects"]).append(
            result.rejects_table()
        )
    return _plain(counts)


#: kinds that can be streamed in batches: kind -> (module, generator of ImportResults)
STREAMING: dict[str, tuple[str, str]] = {
    "extxyz": ("pipeline.sources.files.extxyz", "iter_extxyz"),
    "ase-db": ("pipeline.sources.files.asedb", "iter_ase_db"),
}


def _plan(path: Path, kind: str) -> Iterator[tuple[Path, str | None, ImportResult | None]]:
    """(file, kind, None) for each file to import under ``path``, or (file, None, reject) when its kind cannot
    be told."""
    if kind != "auto":
        yield path, kind, None
        return
    children = _loose_files(path)
    for child in children if children is not None else [path]:
        detected, rejected = _detect_or_reject(child)
        yield child, detected, rejected


def import_to_dataset(
    path: str | Path, out_dir: str | Path, kind: str = "auto", batch_size: int = 10_000, **options: Any
) -> dict[str, Any]:
    """Import ``path`` (a file or a folder, read recursively) and append it under ``out_dir`` (as
    :func:`write_import`), streaming large extxyz files and ASE databases in batches of ``batch_size`` so that
    memory stays bounded; small files are gathered into parts of up to ``batch_size`` rows. Returns summed
    counts (``files``, read / written / already stored per table, ``rejected_by_reason``...)."""
    path = Path(path)
    totals = _zero()
    buffer = ImportResult(SOURCE)
    origins: dict[int, str] = {}  # id(row) -> its file, to name the file of a conflicting duplicate

    def add(result: ImportResult, file: Path) -> ImportResult:
        origins.update((id(r), str(file)) for r in result.rows)
        return _qualify(result, file)

    def flush() -> None:
        nonlocal buffer
        if buffer.rows or buffer.rejects:
            _add(totals, write_import(buffer, out_dir, origins))
        buffer = ImportResult(SOURCE)
        origins.clear()

    plan = list(_plan(path, kind))
    for file, detected, rejected in progress(plan, desc="import", unit="file"):
        totals["files"] += 1
        if detected is None:
            buffer.extend(add(rejected, file))
        elif detected in STREAMING:
            flush()
            module, name = STREAMING[detected]
            fn = getattr(importlib.import_module(module), name)
            accepted = inspect.signature(fn).parameters
            totals["options_ignored"].update(k for k in options if k not in accepted)
            for part in fn(file, batch_size=batch_size, **{k: v for k, v in options.items() if k in accepted}):
                _add(totals, write_import(add(part, file), out_dir, origins))
                origins.clear()
        else:
            try:
                result, ignored = _run_importer(detected, file, options)
            except Exception as exc:  # noqa: BLE001 - an importer that breaks on one file rejects that file
                result, ignored = ImportResult(SOURCE), []
                result.reject(file.name, RecordError(f"unreadable {detected} file: {type(exc).__name__}: {exc}"))
            totals["options_ignored"].update(ignored)
            buffer.extend(add(result, file))
        if len(buffer.rows) >= batch_size:
            flush()
    flush()
    return _plain(totals)


def summary_line(counts: Mapping[str, Any], label: str = "import") -> str:
    """One line: files, records, stored, already stored, rejected (by reason), options ignored."""
    records = counts["frames_read"] + counts["entries_read"] + counts["rejects_read"] - counts["conflicts"]
    reasons = ", ".join(f"{k}: {v}" for k, v in Counter(counts["rejected_by_reason"]).most_common(6))
    more = len(counts["rejected_by_reason"]) - 6
    line = (f"{label}: {counts['files']} files, {records} records: {counts['frames_written']} frames and "
            f"{counts['entries_written']} entries stored, {counts['already_stored']} already stored, "
            f"{counts['rejects_read']} rejected")
    if reasons:
        line += f" ({reasons}{f', {more} more reasons' if more > 0 else ''})"
    if counts["options_ignored"]:
        line += f"; options ignored by these files' importers: {', '.join(sorted(counts['options_ignored']))}"
    return line


def import_paths(paths: list[str | Path], out_dir: str | Path, kind: str = "auto",
                 **options: Any) -> tuple[list[dict[str, Any]], str]:
    """Import every path; (per-path counts as plain JSON-able dicts, one summary line of the whole run)."""
    per_path, totals = [], _zero()
    for p in paths:
        counts = import_to_dataset(p, out_dir, kind=kind, **options)
        _add(totals, counts)
        per_path.append({"path": str(p), **counts})
    return per_path, summary_line(totals)
