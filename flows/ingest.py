"""Ingestion flows: real files, and the Materials Project (mp-api, MP_API_KEY)."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows import tasks


@flow(name="ingest-files")
def ingest_files_flow(paths: list[str], out_dir: str, kind: str = "auto") -> list[dict[str, Any]]:
    """Import each file into out_dir/{frames,entries,rejects}; a bad record never stops the others."""
    return [tasks.import_files(p, out_dir, kind) for p in paths]


@flow(name="ingest-mp")
def ingest_mp_flow(chemsys: list[str], out_dir: str) -> dict[str, Any]:
    """Entries (GGA_GGA+U, R2SCAN, mixed) and relaxation trajectories of the chemical systems; resumable."""
    return tasks.ingest_mp(chemsys, out_dir)
