"""Screening flow: relax candidates with a checkpoint at one fidelity, E_hull against both hulls, report."""

from __future__ import annotations

from prefect import flow

from flows import tasks


@flow(name="screen")
def screen_flow(candidates: list[str], references_dir: str, checkpoint: str, thermo_type: str, fidelity: str,
                out_dir: str, truth_dir: str | None = None, model_fidelity: str | None = None,
                device: str = "cpu") -> dict[str, str]:
    return tasks.screen(candidates, references_dir, checkpoint, thermo_type, fidelity, out_dir,
                        truth_dir=truth_dir, model_fidelity=model_fidelity, device=device)
