"""mfhull: materials screening for energy above hull with a multi-fidelity equivariant potential.

Stages (one sub-package each): ``sources`` (ingest), ``model`` + ``train`` (the potential), ``relax``,
``hull``, ``report``. ``schema``, ``io``, ``frames`` and ``entries`` are the shared data layer.
``pipeline.screen_structures`` (pipeline/api.py) is the notebook entry point.
"""

__version__ = "0.1.0"

__all__ = ["__version__", "screen_structures"]


def __getattr__(name: str):
    # lazy: `import pipeline` stays light (no torch / pymatgen) for the CLI's --version and the sub-packages
    if name == "screen_structures":
        from pipeline.api import screen_structures

        return screen_structures
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
