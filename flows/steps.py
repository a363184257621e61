"""Deployment pull step: enter the mfhull checkout named by MFHULL_REPO on the worker, or fail in one line.

Prefect's own ``set_working_directory`` step, given an unset ``{{ $MFHULL_REPO }}``, dies with a bare
FileNotFoundError; this step says which variable is missing and what it must hold.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_VAR = "MFHULL_REPO"


class WorkerConfigError(RuntimeError):
    """The worker's environment lacks something a deployment needs."""


def enter_repo(directory: str | None = None) -> dict[str, str]:
    """chdir into ``directory`` (normally ``{{ $MFHULL_REPO }}``) after checking it is an mfhull checkout."""
    value = (directory or "").strip()
    if not value or value.startswith(("{{", "$")):
        value = os.environ.get(REPO_VAR, "").strip()
    if not value:
        raise WorkerConfigError(f"{REPO_VAR} is not set on this worker: set it to the path of an mfhull checkout "
                                f"(the folder holding prefect.yaml) before `prefect worker start`")
    repo = Path(value).expanduser()
    if not (repo / "prefect.yaml").is_file() or not (repo / "flows").is_dir():
        raise WorkerConfigError(f"{REPO_VAR}={value} is not an mfhull checkout (no prefect.yaml and flows/ there)")
    os.chdir(repo)
    return {"directory": str(repo.resolve())}
