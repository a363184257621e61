"""Active learning: uncertainty per candidate, acquisition of new high-fidelity labels, and the loop
(screen -> pick -> label -> fine-tune -> re-screen).

:mod:`pipeline.active.pool` (candidate pools and oracles), :mod:`pipeline.active.uncertainty` (ensemble, fidelity
gap, calibration, coverage), :mod:`pipeline.active.acquisition` (ranking), :mod:`pipeline.active.loop` (the
resumable loop). ``mfhull loop`` and the ``active-loop`` Prefect flow (``flows/loop.py``) run it.
"""
