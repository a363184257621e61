"""label stage: make NEW data with DFT (the sources stage only reads data that exists).

:mod:`pipeline.label.dft` labels structures at named fidelities with any ASE calculator (GPAW built in) into
frames rows; the project's own data-set generators live next to it (:mod:`pipeline.label.demo_set`: the Li-Al
demo set in ``data/demo``). Re-exported lazily, so importing the package does not import GPAW or ASE's optimizers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Fidelity": "pipeline.label.dft",
    "GpawSettings": "pipeline.label.dft",
    "LabelError": "pipeline.label.dft",
    "Labeller": "pipeline.label.dft",
    "gpaw_fidelities": "pipeline.label.dft",
}

__all__ = ["Fidelity", "GpawSettings", "LabelError", "Labeller", "gpaw_fidelities"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'pipeline.label' has no attribute {name!r}")
