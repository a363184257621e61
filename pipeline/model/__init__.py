"""Multi-fidelity E(3)-equivariant potential (SevenNet-MF architecture, e3nn): config, layers, potential,
per-fidelity element references, checkpoints and the SevenNet checkpoint importer."""

from pipeline.model.checkpoint import load_checkpoint, save_checkpoint
from pipeline.model.composite import SumPotential
from pipeline.model.config import PRESETS, ModelConfig, preset
from pipeline.model.potential import MFPotential, UnknownElementError
from pipeline.model.references import ElementReferences, fit_element_references, references_from_frames
from pipeline.model.sevenn_import import import_sevenn

__all__ = [
    "PRESETS",
    "ElementReferences",
    "MFPotential",
    "ModelConfig",
    "SumPotential",
    "UnknownElementError",
    "fit_element_references",
    "import_sevenn",
    "load_checkpoint",
    "preset",
    "references_from_frames",
    "save_checkpoint",
]
