"""JSON sets of pymatgen ``ComputedEntry`` / ``ComputedStructureEntry`` (monty-serialised) -> entry rows.

Handles a JSON(.gz) file holding a list of entry dicts (emmet ``Li-Fe-O.json.gz``, reaction-network
``*_entries.json.gz``) or a mapping of them (matbench-discovery's elemental references, keyed by element).
Each record is decoded on its own with monty's ``MontyDecoder``, so one bad record is a reject and the rest
import (``monty.serialization.loadfn`` would fail the whole file).

The shared MP sets are MP2020-corrected GGA/GGA+U entries (their ``energy_adjustments`` are the MP2020
corrections): ``thermo_type`` defaults to ``GGA_GGA+U`` and every entry's run type must then be GGA or GGA+U
(anything else is rejected instead of being filed under the wrong thermo type). Pass ``thermo_type="raw"``
for uncorrected sets. Entries keep everything pymatgen needs to rebuild them exactly
(:func:`pipeline.entries.row_to_entry`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from monty.json import MontyDecoder
from pymatgen.core.entries import ComputedEntry

from pipeline.entries import entry_to_row, normalize_run_type
from pipeline.frames import RecordError
from pipeline.sources.base import ImportResult, collect
from pipeline.sources.common import failed_file, read_json

SOURCE = "entries-json"

#: run types each thermo type may hold (None: no check)
THERMO_RUN_TYPES: dict[str, set[str] | None] = {
    "GGA_GGA+U": {"GGA", "GGA+U"},
    "R2SCAN": {"R2SCAN"},
    "GGA_GGA+U_R2SCAN": {"GGA", "GGA+U", "R2SCAN"},
    "raw": None,
}


def entry_records(data: Any, name: str) -> Iterator[tuple[str, Any]]:
    """(record id, entry dict) of a list (``name:index``) or mapping (``name:key``) of entries."""
    if isinstance(data, Mapping) and "@class" in data:
        yield f"{name}:0", data
    elif isinstance(data, Mapping):
        for key, value in data.items():
            yield f"{name}:{key}", value
    elif isinstance(data, list):
        for i, value in enumerate(data):
            yield f"{name}:{i}", value
    else:
        raise RecordError(f"{name}: expected a list or mapping of entries, got {type(data).__name__}")


def decode_entry(record: Any) -> ComputedEntry:
    """A monty entry dict -> ComputedEntry / ComputedStructureEntry, or :class:`RecordError`."""
    if not isinstance(record, Mapping) or "@class" not in record:
        raise RecordError("not a monty-serialised entry (no '@class')")
    try:
        entry = MontyDecoder().process_decoded(dict(record))
    except Exception as exc:  # monty/pymatgen raise many types for broken dicts
        raise RecordError(f"cannot decode {record.get('@class')}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(entry, ComputedEntry):
        raise RecordError(f"decoded to {type(entry).__name__}, not a ComputedEntry")
    return entry


def read_entries_json(
    path: str | Path,
    *,
    thermo_type: str = "GGA_GGA+U",
    source: str = SOURCE,
    fidelity: str | None = None,
    limit: int | None = None,
) -> tuple[list[ComputedEntry], ImportResult]:
    """The decoded entries that imported, and the import result (rows + rejects); see :func:`import_entries_json`."""
    if thermo_type not in THERMO_RUN_TYPES:
        raise ValueError(f"unknown thermo_type {thermo_type!r}; known: {sorted(THERMO_RUN_TYPES)}")
    path = Path(path)
    allowed = THERMO_RUN_TYPES[thermo_type]
    entries: list[ComputedEntry] = []
    try:
        records = list(entry_records(read_json(path), path.name))[:limit]
    except Exception as exc:  # noqa: BLE001 - an unreadable file is one reject
        return entries, failed_file(source, path, "entries file", exc)

    def convert(record_id: str, record: Any) -> list[dict[str, Any]]:
        entry = decode_entry(record)
        run_type = normalize_run_type((entry.parameters or {}).get("run_type"))
        if allowed is not None and run_type not in allowed:
            raise RecordError(f"run_type {run_type!r} does not belong to thermo_type {thermo_type}")
        meta = {"file": path.name, "record": record_id.rsplit(":", 1)[1]}
        row = entry_to_row(entry, source=source, thermo_type=thermo_type, fidelity=fidelity, meta=meta)
        entries.append(entry)
        return [row]

    return entries, collect(source, records, convert)


def import_entries_json(
    path: str | Path,
    *,
    thermo_type: str = "GGA_GGA+U",
    source: str = SOURCE,
    fidelity: str | None = None,
    limit: int | None = None,
) -> ImportResult:
    """Entry rows of every entry in a JSON(.gz) file; undecodable or invalid entries become rejects.

    ``fidelity`` overrides the one derived from each entry's run type; ``limit`` keeps the first records only.
    """
    return read_entries_json(path, thermo_type=thermo_type, source=source, fidelity=fidelity, limit=limit)[1]
