"""Checkpoints of :class:`MFPotential`: weights + config + fidelity map + element references + version.

A checkpoint is a plain dict of tensors, strings, numbers, lists and dicts, written atomically with
``torch.save`` and read back with ``torch.load(..., weights_only=True)`` (no pickled code is ever executed).
Training state (optimizer, epoch, metrics) can ride along under ``extra``, as long as it is made of the same
plain types. A :class:`~pipeline.model.composite.SumPotential` (the ``delta`` strategy's low model + delta model)
is stored as format ``mfhull-sum``, embedding each term's checkpoint; :func:`load_checkpoint` reads both.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from pipeline.io.atomic import atomic_path
from pipeline.model.composite import SUM_FORMAT, SumPotential, sum_checkpoint_dict
from pipeline.model.config import ModelConfig
from pipeline.model.potential import MFPotential

__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "checkpoint_dict", "load_checkpoint", "save_checkpoint"]

CHECKPOINT_FORMAT = "mfhull-potential"
CHECKPOINT_VERSION = 1


def checkpoint_dict(model: MFPotential, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The checkpoint content of ``model`` (weights on CPU, in the model's dtype)."""
    return {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "config": model.config.to_dict(),
        "fidelities": list(model.config.fidelities),
        "elements": list(model.config.elements),
        "references": model.references().to_dict(),
        "dtype": str(model.shift.dtype).removeprefix("torch."),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "extra": extra or {},
    }


def save_checkpoint(model: MFPotential | SumPotential, path: str | os.PathLike[str],
                    extra: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint atomically (a crash never leaves a half-written file at ``path``)."""
    content = sum_checkpoint_dict(model, extra) if isinstance(model, SumPotential) else checkpoint_dict(model, extra)
    with atomic_path(path) as tmp:
        torch.save(content, tmp)
    return Path(path)


def _check_version(data: dict[str, Any], where: str) -> None:
    version = int(data.get("version", 0))
    if version > CHECKPOINT_VERSION:
        raise ValueError(f"{where}: checkpoint version {version} is newer than supported ({CHECKPOINT_VERSION})")


def _potential(data: Any, where: str) -> MFPotential:
    """The MFPotential of one ``mfhull-potential`` checkpoint dict (stored dtype, CPU)."""
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{where} is not an mfhull potential checkpoint")
    _check_version(data, where)
    config = ModelConfig.from_dict(data["config"])
    model = MFPotential(config)
    stored_dtype = getattr(torch, data.get("dtype", "float32"))
    model = model.to(stored_dtype)
    missing, unexpected = model.load_state_dict(data["state_dict"], strict=False)
    if missing or unexpected:
        raise ValueError(f"{where}: weights do not fit the stored config (missing {missing}, unexpected {unexpected})")
    return model


def load_checkpoint(
    path: str | os.PathLike[str], dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> MFPotential | SumPotential:
    """Load a model saved by :func:`save_checkpoint` (``weights_only=True``), in eval mode.

    ``dtype``: None keeps the stored dtype; torch.float64 for double precision inference."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    data = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(data, dict) and data.get("format") == SUM_FORMAT:
        _check_version(data, str(path))
        terms = [(_potential(t.get("checkpoint"), f"{path} term {i}"), str(t.get("fidelity")))
                 for i, t in enumerate(data.get("terms") or [])]
        model: MFPotential | SumPotential = SumPotential(terms, data.get("name", "sum"))
    else:
        model = _potential(data, str(path))
    model = model.to(device=device, dtype=dtype or model.shift.dtype)
    model.eval()
    return model
