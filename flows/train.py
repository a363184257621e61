"""Training flow (the `train-gpu` deployment on the gpu work pool; resumes from its last checkpoint).

The flow calls the library; with ``devices`` > 1 (0: every GPU the worker sees) its task launches torchrun with
that many processes on the worker's node (pipeline.train.launch), each one a DDP rank of the library's trainer.
"""

from __future__ import annotations

from prefect import flow

from flows import tasks


@flow(name="train")
def train_flow(frames_dir: str, out_dir: str, preset: str = "small", epochs: int = 100, batch_size: int = 8,
               lr: float = 5e-3, device: str = "cpu", label_policy: dict[str, list[str]] | None = None,
               devices: int = 1, stream: bool | None = None, max_atoms: int | None = None,
               sampling_weights: dict[str, float] | None = None, accumulate: int = 1, precision: str = "float32",
               workers: int = 0, checkpoint_every: int = 0) -> str:
    """Train the multi-fidelity potential; returns the best checkpoint's path."""
    return tasks.train(frames_dir, out_dir, preset=preset, epochs=epochs, batch_size=batch_size, lr=lr,
                       device=device, label_policy=label_policy, devices=devices, stream=stream,
                       max_atoms=max_atoms, sampling_weights=sampling_weights, accumulate=accumulate,
                       precision=precision, workers=workers, checkpoint_every=checkpoint_every)
