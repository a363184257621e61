"""Provenance of one report: run id, UTC time, code version, package versions, settings, Prefect flow-run id.

Everything a reader of ``report.parquet`` needs to know what produced it; stored in the Parquet schema metadata
(key ``provenance``, JSON), in ``summary.json`` and, per row, as ``run_id``.
"""

from __future__ import annotations

import re
import subprocess
import sys
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import pipeline

#: Packages whose versions decide the numbers in a report.
KEY_PACKAGES = ("torch", "e3nn", "pymatgen", "pymatgen-core", "ase", "numpy", "scipy", "pyarrow", "prefect", "sevenn")

_MATERIAL_ID = re.compile(r"\b(mp-\d+|mvc-\d+|wbm-\d+-\d+|agm\d+)\b")


def new_run_id() -> str:
    """A fresh run id: UTC date-time plus 8 random hex digits (sorts by time, unique across machines)."""
    return f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"


def package_versions(names: tuple[str, ...] = KEY_PACKAGES) -> dict[str, str | None]:
    """Installed version of each package (None when it is not installed)."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def code_version() -> str:
    """mfhull's version, plus the git commit (and '-dirty') when the code runs from a git checkout."""
    version = pipeline.__version__
    root = Path(pipeline.__file__).resolve().parent.parent
    try:
        described = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=10"], cwd=root,
                                   capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return version
    return f"{version}+g{described}" if described else version


def prefect_flow_run_id() -> str | None:
    """The Prefect flow-run id when this runs inside a Prefect flow run, else None (Prefect is not imported
    for that: a flow run has imported it already)."""
    if "prefect" not in sys.modules:
        return None
    try:
        from prefect.runtime import flow_run
    except ImportError:
        return None
    run_id = flow_run.id
    return None if run_id is None else str(run_id)


def material_id(*texts: str | None, meta: Mapping[str, Any] | None = None) -> str | None:
    """The material id of a candidate: ``meta['material_id']`` when given, else the first MP/WBM/Alexandria-style
    id (mp-123, mvc-1, wbm-1-234, agm123) found in the given texts (candidate id, origin); None when unknown."""
    if meta and meta.get("material_id"):
        return str(meta["material_id"])
    for text in texts:
        match = _MATERIAL_ID.search(text or "")
        if match:
            return match.group(1)
    return None


def provenance(run_id: str | None = None, **settings: Any) -> dict[str, Any]:
    """Provenance record of a run; ``settings`` (relaxation settings, thermo type, reference window...) are
    stored as given (JSON-serialisable values)."""
    return {
        "run_id": run_id or new_run_id(),
        "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "code_version": code_version(),
        "python": sys.version.split()[0],
        "packages": package_versions(),
        "prefect_flow_run_id": prefect_flow_run_id(),
        **settings,
    }
