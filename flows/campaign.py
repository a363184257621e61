"""The campaign flow: ingest -> candidates -> model -> screen at each fidelity -> report + artifacts.

Thin: every step is a task calling the library (pipeline.campaign, pipeline.screening, pipeline.sources);
relaxation batches fan out through prefect-dask (flows/relax.py).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from flows import tasks
from flows.relax import relax_all
from pipeline.config import Settings
from pipeline.io import write_json_atomic

DEFAULT_TRAIN_DEPLOYMENT = "train/train-gpu"


def _train_checkpoint(frames_dir: str, out_dir: str, deployment: str, epochs: int) -> str:
    """Train on the gpu pool through run_deployment when a Prefect server is configured, else here."""
    if os.environ.get("PREFECT_API_URL"):
        from prefect.deployments import run_deployment

        run = run_deployment(deployment, parameters={"frames_dir": frames_dir, "out_dir": out_dir,
                                                     "epochs": epochs}, timeout=None)
        if not run.state or not run.state.is_completed():
            raise RuntimeError(f"training deployment {deployment} ended {run.state and run.state.name}")
        return str(Path(out_dir) / "best.pt")
    return tasks.train(frames_dir, out_dir, epochs=epochs)


@flow(name="campaign", flow_run_name="campaign-{chemsys}", log_prints=True)
def campaign_flow(
    chemsys: str,
    entries: list[str] | None = None,
    candidates: list[str] | None = None,
    substitute: bool = False,
    prototypes: list[str] | None = None,
    truth: list[str] | None = None,
    checkpoint: str | None = None,
    model: str = "7net-mf-0",
    train: bool = False,
    train_epochs: int = 100,
    train_deployment: str = DEFAULT_TRAIN_DEPLOYMENT,
    fidelities: list[str] | None = None,
    model_fidelity: str | None = None,
    thermo_types: dict[str, str] | None = None,
    max_candidates: int = 20,
    reference_window: float | None = None,
    fmax: float = 0.05,
    steps: int = 500,
    batch_size: int = 4,
    dask_address: str | None = None,
    dask_workers: int = 2,
    device: str | None = None,
    out_dir: str | None = None,
) -> dict[str, Any]:
    """Screen ``chemsys``: reference entries from ``entries`` files/datasets (or the Materials Project when
    MP_API_KEY / the `mp-api-key` Secret block is set and no entries are given), candidates from files and/or
    prototype substitution, a model (``checkpoint``, the pretrained ``model``, or training with ``train``),
    screened at each of ``fidelities`` (default r2scan) into ``out_dir/screen-<fidelity>/``."""
    from pipeline.campaign import thermo_type_for

    logger = get_run_logger()
    from pipeline.sources.mp import normalize_chemsys

    chemsys = normalize_chemsys(chemsys)
    out = Path(out_dir) if out_dir else Settings().reports_dir / f"campaign-{chemsys}"
    device = device or os.environ.get("MFHULL_DEVICE", "cpu")
    fidelities = fidelities or ["r2scan"]
    data = out / "data"
    summary: dict[str, Any] = {"chemsys": chemsys, "out_dir": str(out)}

    if entries:
        summary["ingest"] = tasks.gather_entries([str(p) for p in entries], str(data))
    elif tasks.has_mp_key():
        summary["ingest"] = tasks.ingest_mp([chemsys], str(data))
    else:
        raise ValueError("no reference entries: give entries files/datasets (--entries), or set MP_API_KEY "
                         "(or the Prefect Secret block 'mp-api-key') to ingest from the Materials Project")
    references = str(data / "entries")

    proto_dir = references
    if substitute and prototypes:
        tasks.gather_entries([str(p) for p in prototypes], str(out / "prototypes"))
        proto_dir = str(out / "prototypes" / "entries")
    made = tasks.make_candidates(chemsys, str(out), files=[str(p) for p in candidates or []],
                                 substitute=substitute, prototypes=proto_dir if substitute else None,
                                 references=references, max_candidates=max_candidates)
    summary["candidates"] = made
    truth_dir = None
    if truth:
        tasks.gather_entries([str(p) for p in truth], str(out / "truth"))
        truth_dir = str(out / "truth" / "entries")

    if checkpoint:
        ckpt = checkpoint
    elif train:
        ckpt = _train_checkpoint(str(data / "frames"), str(out / "model"), train_deployment, train_epochs)
    else:
        ckpt = tasks.pretrained_model(model, str(Settings().data_dir.parent / "models"))
    summary["checkpoint"] = ckpt

    summary["reports"] = {}
    for fidelity in fidelities:
        screen_dir = out / f"screen-{fidelity}"
        thermo = (thermo_types or {}).get(fidelity) or thermo_type_for(fidelity)
        settings = {"fmax": fmax, "steps": steps, "device": device, "model_fidelity": model_fidelity}
        summary.setdefault("relaxations", {})[fidelity] = relax_all(
            made["candidates"], references, ckpt, fidelity, str(screen_dir / "relaxations"), thermo_type=thermo,
            reference_window=reference_window, batch_size=batch_size, dask_address=dask_address,
            dask_workers=dask_workers, **settings)
        files = tasks.screen([made["candidates"]], references, ckpt, thermo, fidelity, str(screen_dir),
                             truth_dir=truth_dir, reference_window=reference_window, **settings)
        tasks.publish(files, fidelity, f"campaign {chemsys}")
        summary["reports"][fidelity] = files
        logger.info("%s at %s: report %s", chemsys, fidelity, files["report"])
    write_json_atomic(out / "campaign_summary.json", summary)
    return summary
