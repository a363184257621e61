"""Training flow (runs on the GPU work pool in deployments; resumes from its last checkpoint)."""

from __future__ import annotations

from prefect import flow

from flows import tasks


@flow(name="train")
def train_flow(frames_dir: str, out_dir: str, preset: str = "small", epochs: int = 100, batch_size: int = 8,
               lr: float = 5e-3, device: str = "cpu", label_policy: dict[str, list[str]] | None = None) -> str:
    """Train the multi-fidelity potential; returns the best checkpoint's path."""
    return tasks.train(frames_dir, out_dir, preset=preset, epochs=epochs, batch_size=batch_size, lr=lr,
                       device=device, label_policy=label_policy)
