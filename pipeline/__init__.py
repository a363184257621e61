"""mfhull: materials screening for energy above hull with a multi-fidelity equivariant potential.

Stages (one sub-package each): ``sources`` (ingest), ``model`` + ``train`` (the potential), ``relax``,
``hull``, ``report``. ``schema``, ``io``, ``frames`` and ``entries`` are the shared data layer.
"""

__version__ = "0.1.0"
