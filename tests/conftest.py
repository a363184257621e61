"""Shared fixtures. Real MP data is read in place from ../shared/data/mp (never copied into the repo)."""

from __future__ import annotations

import os

# Small-matrix BLAS calls (ASE cell filters, pymatgen) slow down 30x when OpenBLAS threads fight other processes
# for 2 cores; set before numpy is imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
from pathlib import Path

import pytest

from pipeline.config import shared_data_dir

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def _missing(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: shared data must be present)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def mp_data() -> Path:
    """Folder of the real Materials Project files; skip (or fail under CI) when it is missing."""
    root = shared_data_dir()
    if not root.is_dir():
        _missing(f"shared MP data not found at {root}")
    return root


@pytest.fixture(scope="session")
def mp_file(mp_data: Path):
    """Return a function giving the path of one shared file, skipping (failing under CI) if it is absent."""

    def get(rel: str) -> Path:
        path = mp_data / rel
        if not path.exists():
            _missing(f"shared MP file not found: {path}")
        return path

    return get
