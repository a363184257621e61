"""sources stage: importers of real file formats and MP data into the frames / entries Parquet schema.

``import_path(path, kind="auto")``, ``write_import(result, out_dir)`` and ``import_to_dataset(path, out_dir)``
(streamed) from :mod:`pipeline.sources.files` are the entry points. Modules are grouped by origin:
:mod:`pipeline.sources.files` (extxyz, asedb, entries_json, matpes, wbm, res: files on disk) and
:mod:`pipeline.sources.mp` (the mp-api ingestion, its client ``mp_client`` and MP task documents ``taskdocs``);
``base`` and ``common`` are shared. They are re-exported lazily, so that importing one importer does not load
all the others.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ImportResult": "pipeline.sources.base",
    "collect": "pipeline.sources.base",
    "detect_kind": "pipeline.sources.files",
    "import_path": "pipeline.sources.files",
    "import_to_dataset": "pipeline.sources.files",
    "write_import": "pipeline.sources.files",
}

__all__ = ["ImportResult", "collect", "detect_kind", "import_path", "import_to_dataset", "write_import"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'pipeline.sources' has no attribute {name!r}")
