"""The offline demo: train the multi-fidelity potential on the project's own GPAW Li-Al set (PBE everywhere,
r2SCAN on a subset), check it on the held-out r2SCAN frames, and screen the demo candidates at both fidelities
against the DFT hulls and the all-model hulls. Runs on Prefect's embedded API unless PREFECT_API_URL is set."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow

from flows import tasks
from pipeline.config import PROJECT_ROOT
from pipeline.io import write_json_atomic

DEMO_DATA = PROJECT_ROOT / "data" / "demo"
DEMO_FIDELITIES = ("gpaw-r2scan", "gpaw-pbe")
DEMO_EPOCHS = 60


@flow(name="demo")
def demo_flow(out_dir: str | None = None, epochs: int | None = None, data_dir: str | None = None) -> dict[str, Any]:
    data = Path(data_dir) if data_dir else DEMO_DATA
    out = Path(out_dir) if out_dir else PROJECT_ROOT / "reports" / "demo"
    missing = [p for p in ("frames", "entries", "candidates.extxyz") if not (data / p).exists()]
    if missing:
        raise FileNotFoundError(f"demo data incomplete in {data}: missing {missing}")
    t0 = time.perf_counter()
    checkpoint = tasks.train(str(data / "frames"), str(out / "model"), epochs=epochs or DEMO_EPOCHS)
    summary: dict[str, Any] = {"checkpoint": checkpoint, "train_s": time.perf_counter() - t0}
    if (data / "test_frames").exists():
        summary["held_out_test"] = tasks.evaluate(checkpoint, str(data / "test_frames"))
    summary["reports"] = {}
    for fidelity in DEMO_FIDELITIES:
        files = tasks.screen([str(data / "candidates.extxyz")], str(data / "entries"), checkpoint, "raw", fidelity,
                             str(out / f"screen-{fidelity}"), truth_dir=str(data / "candidates"))
        summary["reports"][fidelity] = files
    summary["total_s"] = time.perf_counter() - t0
    write_json_atomic(out / "demo_summary.json", summary)
    return summary
