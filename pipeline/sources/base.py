"""What every importer returns: the good rows, the rejected records with their errors, and counts."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pyarrow as pa

from pipeline.schema import REJECTS_SCHEMA

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class ImportResult:
    """Rows that imported, and one reject (record id, error) per record that did not."""

    source: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    rejects: list[dict[str, str]] = field(default_factory=list)

    @property
    def n_ok(self) -> int:
        return len(self.rows)

    @property
    def n_rejected(self) -> int:
        return len(self.rejects)

    def reject(self, record_id: str, error: BaseException | str) -> None:
        msg = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else str(error)
        log.warning("%s: rejected %s: %s", self.source, record_id, msg)
        self.rejects.append({"record_id": str(record_id), "source": self.source, "error": msg})

    def extend(self, other: ImportResult) -> ImportResult:
        self.rows.extend(other.rows)
        self.rejects.extend(other.rejects)
        return self

    def rejects_table(self) -> pa.Table:
        return pa.Table.from_pylist(self.rejects, schema=REJECTS_SCHEMA)

    def summary(self) -> str:
        return f"{self.source}: imported {self.n_ok}, rejected {self.n_rejected}"


def collect(
    source: str, records: Iterable[tuple[str, T]], convert: Callable[[str, T], Iterable[dict[str, Any]]]
) -> ImportResult:
    """Run ``convert(record_id, record)`` over records; a failing record becomes a reject, the rest carry on."""
    result = ImportResult(source)
    for record_id, record in records:
        try:
            result.rows.extend(convert(record_id, record))
        except Exception as exc:  # noqa: BLE001 - every bad record is reported and skipped
            result.reject(record_id, exc)
    log.info(result.summary())
    return result
