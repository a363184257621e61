"""Prefect tasks: thin wrappers that pass paths in and out and call the library (no science here)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task


@task(name="import-files")
def import_files(path: str, out_dir: str, kind: str = "auto") -> dict[str, Any]:
    from pipeline.sources.files import import_to_dataset

    return {"path": path, **import_to_dataset(path, out_dir, kind=kind)}


@task(name="ingest-mp", retries=2, retry_delay_seconds=60)
def ingest_mp(chemsys: list[str], out_dir: str) -> dict[str, Any]:
    from pipeline.sources.mp import ingest_mp as run

    report = run(chemsys, out_dir)
    return dict(report.__dict__) if hasattr(report, "__dict__") else {"report": str(report)}


@task(name="train")
def train(frames_dir: str, out_dir: str, preset: str = "small", epochs: int = 100, batch_size: int = 8,
          lr: float = 5e-3, seed: int = 0, device: str = "cpu",
          label_policy: dict[str, list[str]] | None = None) -> str:
    """Train (resuming from out_dir/last.pt if present); returns the best checkpoint's path."""
    from pipeline.io import read_table
    from pipeline.model import preset as model_preset
    from pipeline.schema import FRAMES_SCHEMA
    from pipeline.train import TrainConfig
    from pipeline.train import train as run

    policy = {k: tuple(v) for k, v in label_policy.items()} if label_policy else None
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, device=device, label_policy=policy)
    result = run(read_table(frames_dir, FRAMES_SCHEMA), model_preset(preset), cfg, out_dir)
    return str(result.best)


@task(name="evaluate")
def evaluate(checkpoint: str, frames_dir: str) -> dict[str, float]:
    from pipeline.io import read_table
    from pipeline.model import load_checkpoint
    from pipeline.schema import FRAMES_SCHEMA
    from pipeline.train import evaluate_frames

    return evaluate_frames(load_checkpoint(checkpoint), read_table(frames_dir, FRAMES_SCHEMA))


@task(name="screen")
def screen(candidates: list[str], references_dir: str, checkpoint: str, thermo_type: str, fidelity: str,
           out_dir: str, truth_dir: str | None = None, model_fidelity: str | None = None,
           fmax: float = 0.05, steps: int = 300, device: str = "cpu") -> dict[str, str]:
    from pipeline.hull.candidates import candidates_table, read_candidate_files
    from pipeline.io import read_table
    from pipeline.relax.relaxer import RelaxSettings
    from pipeline.schema import ENTRIES_SCHEMA
    from pipeline.screening import screen as run

    cands = read_candidate_files(candidates)
    truth = read_table(truth_dir, ENTRIES_SCHEMA) if truth_dir and Path(truth_dir).exists() else None
    files = run(candidates_table(cands.rows), read_table(references_dir, ENTRIES_SCHEMA), checkpoint=checkpoint,
                thermo_type=thermo_type, fidelity=fidelity, model_fidelity=model_fidelity, out_dir=out_dir,
                truth=truth, candidate_rejects=cands.rejects, relax=RelaxSettings(fmax=fmax, steps=steps),
                device=device)
    return {k: str(v) for k, v in files.items()}
