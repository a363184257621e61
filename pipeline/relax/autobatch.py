"""Batch budget of the batched relaxer, measured on the device it runs on: how many atoms and neighbour pairs one
energy + forces + stress call may hold (``RelaxSettings(max_atoms="auto")``, ``--batch-atoms auto``).

Two probe batches are built from the structures to relax (repeated until each holds about ``probe_atoms`` atoms)
and one E+F+S call is made on each, as the relaxer makes it (eval mode, weights without gradients). The growth of
the peak memory between the two gives the cost of the batch's contents; the intercept (weights, the CUDA context,
fixed work buffers) cancels:

* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, against the free memory of
  ``torch.cuda.mem_get_info``;
* CPU: the process's peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs``) above the resident set
  before the call, against ``MemAvailable`` of ``/proc/meminfo`` (so the process's peak-RSS counter, also
  ``ru_maxrss``, restarts at each probe). Without ``/proc`` (not Linux) the budget is
  the CPU cap.

From peak = c + m, with m the growth per probe contents, ``bytes_per_atom`` = dm/d(atoms) and ``bytes_per_edge`` =
dm/d(edges) each charge the WHOLE growth to one quantity. A batch with at most ``(usable - c) / bytes_per_atom``
atoms and at most ``(usable - c) / bytes_per_edge`` edges then stays under ``usable`` whatever the true split
between per-atom and per-edge memory is (memory is linear and increasing in both), as long as its structures are
not denser than the probe's on average (the edge bound covers that case too).

``usable`` = ``fraction`` of the free memory (CUDA 0.8, CPU 0.5). On CPU the budget is also capped at
:data:`CPU_MAX_ATOMS` atoms: there a batch does not run faster per atom once the per-step overhead is amortised
(per-atom compute dominates), so a larger one only costs memory.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from ase import Atoms

from pipeline.graphs import Graph, atoms_to_graph
from pipeline.model.potential import MFPotential

log = logging.getLogger(__name__)

__all__ = ["CPU_MAX_ATOMS", "BatchBudget", "budget_from_probes", "estimate_batch_budget"]

#: largest CPU batch (atoms): beyond this batching gains nothing on CPU (see the module doc)
CPU_MAX_ATOMS = 512
#: fraction of the free memory a batch may use
FRACTION = {"cuda": 0.8, "cpu": 0.5}
#: a run of at most this many atoms in all is one batch, unmeasured (it costs what one call on such a cell does)
UNMEASURED_ATOMS = 64
#: peak growth between the probes below which it is noise, not a measurement (CPU: the allocator's reuse)
NOISE_BYTES = {"cuda": 1 << 20, "cpu": 16 << 20}
#: probe batch sizes (atoms): small on CPU, where an MF-0 call costs ~60 ms per atom
PROBE_ATOMS = {"cuda": (256, 1024), "cpu": (24, 72)}


@dataclass(frozen=True)
class BatchBudget:
    """The budget and how it was obtained (recorded with the relaxation settings)."""

    max_atoms: int
    max_edges: int | None
    device: str
    method: str  # 'cuda-peak', 'cpu-peak-rss', 'cpu-cap'/'cuda-cap' (no measurement), 'all-fit' (small run)
    bytes_per_atom: float | None = None
    bytes_per_edge: float | None = None
    intercept_bytes: float | None = None
    free_bytes: int | None = None
    fraction: float | None = None
    limited_by: str = "memory"  # 'memory', 'cap' or 'size' (all-fit)

    def as_dict(self) -> dict[str, object]:
        out = asdict(self)
        for k in ("bytes_per_atom", "bytes_per_edge", "intercept_bytes"):
            if out[k] is not None:
                out[k] = round(float(out[k]), 1)
        return out


def budget_from_probes(
    probes: Sequence[tuple[int, int, float]], free_bytes: int, fraction: float, *, device: str, method: str,
    cap_atoms: int | None = None, min_atoms: int = 1, noise_bytes: float = 0.0,
) -> BatchBudget:
    """Budget from probe results ``(atoms, edges, peak bytes)`` (two or more, different sizes) and the free
    memory. A growth between the smallest and the largest probe of at most ``noise_bytes`` is not a measurement
    (a small model on CPU, whose calls fit in memory the allocator already holds): then the largest probe's whole
    peak (at least ``noise_bytes``) is charged to its contents, with no intercept. ``min_atoms``: the largest
    structure, which runs alone anyway."""
    if len(probes) < 2:
        raise ValueError("need at least two probes of different sizes")
    (a1, e1, m1), (a2, e2, m2) = min(probes), max(probes)
    if a2 <= a1:
        raise ValueError(f"probes must differ in size, got {a1} and {a2} atoms")
    if m2 - m1 > noise_bytes:
        per_atom = (m2 - m1) / (a2 - a1)
        per_edge = (m2 - m1) / (e2 - e1) if e2 > e1 else None
        intercept = max(0.0, m1 - per_atom * a1)
    else:  # no measurable growth: an upper bound
        worst = max(m2, noise_bytes, 1.0)
        per_atom = worst / a2
        per_edge = worst / e2 if e2 > 0 else None
        intercept = 0.0
    usable = fraction * free_bytes - intercept
    atoms = max(int(usable // per_atom), 0) if usable > 0 else 0
    edges = max(int(usable // per_edge), 0) if per_edge is not None and usable > 0 else None
    limited = "memory"
    if cap_atoms is not None and atoms > cap_atoms:
        atoms, limited = cap_atoms, "cap"
    if atoms < min_atoms:
        log.warning("batch budget: %d atoms fit %.0f%% of the free memory (%.2f GB) on %s, less than the largest "
                    "structure (%d atoms); that structure runs alone", atoms, 100 * fraction, free_bytes / 1e9,
                    device, min_atoms)
        atoms = max(atoms, 1)
    return BatchBudget(max_atoms=atoms, max_edges=edges, device=device, method=method, bytes_per_atom=per_atom,
                       bytes_per_edge=per_edge, intercept_bytes=intercept, free_bytes=int(free_bytes),
                       fraction=fraction, limited_by=limited)


def _probe_batches(structures: Sequence[Atoms], sizes: Sequence[int]) -> list[list[Atoms]]:
    """For each size, structures taken in turn (cycling) until the batch holds at least that many atoms."""
    batches = []
    for size in sizes:
        batch, n, k = [], 0, 0
        while n < size:
            a = structures[k % len(structures)]
            batch.append(a)
            n += len(a)
            k += 1
        batches.append(batch)
    return batches


def _call(model: MFPotential, graph: Graph) -> None:
    out = model(graph, compute_forces=True, compute_stress=True, create_graph=False)
    float(out["energy"].detach().sum())  # wait for the device
    del out


def _cuda_peak(model: MFPotential, graph: Graph) -> float:
    device = graph.positions.device
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    _call(model, graph)
    torch.cuda.synchronize(device)
    return float(torch.cuda.max_memory_allocated(device) - base)


def _proc_kb(path: str, key: str) -> int | None:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cpu_peak(model: MFPotential, graph: Graph) -> float:
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
    before = _proc_kb("/proc/self/status", "VmRSS")
    _call(model, graph)
    peak = _proc_kb("/proc/self/status", "VmHWM")
    if before is None or peak is None:
        raise OSError("no VmRSS/VmHWM in /proc/self/status")
    return float(max(peak - before, 0) * 1024)


def _cpu_free() -> int:
    kb = _proc_kb("/proc/meminfo", "MemAvailable")
    if kb is None:
        raise OSError("no MemAvailable in /proc/meminfo")
    return kb * 1024


def _cuda_free(device: torch.device) -> int:
    return int(torch.cuda.mem_get_info(device)[0])


def estimate_batch_budget(
    structures: Sequence[Atoms],
    model: MFPotential,
    fidelity: int,
    *,
    cpu_cap: int = CPU_MAX_ATOMS,
    probe_atoms: Sequence[int] | None = None,
    fraction: float | None = None,
    peak_fn: Callable[[MFPotential, Graph], float] | None = None,
    free_fn: Callable[[], int] | None = None,
) -> BatchBudget:
    """Batch budget for relaxing ``structures`` with ``model`` on the model's device (see the module doc).

    ``peak_fn(model, graph)`` (peak bytes of one E+F+S call above the memory in use before it) and ``free_fn()``
    (free bytes) replace the device's own measurements (tests). Structures that cannot become a graph are
    skipped (the relaxer reports them). Runs of at most :data:`UNMEASURED_ATOMS` atoms in all are one batch,
    without a measurement. When nothing can be measured, the budget is ``cpu_cap`` atoms (on CUDA too)."""
    param = model.shift
    device, dtype = param.device, param.dtype
    kind = _device_kind(device)
    fraction = FRACTION[kind] if fraction is None else fraction
    sizes = tuple(probe_atoms or PROBE_ATOMS[kind])
    usable = [a for a in structures if len(a) > 0 and _graph_ok(a, model)]
    total = sum(len(a) for a in usable)
    if 0 < total <= UNMEASURED_ATOMS:
        return BatchBudget(max_atoms=total, max_edges=None, device=str(device), method="all-fit",
                           limited_by="size")
    fallback = BatchBudget(max_atoms=cpu_cap, max_edges=None, device=str(device), method=f"{kind}-cap",
                           limited_by="cap")
    if not usable:
        return fallback
    if peak_fn is None:
        peak_fn = _cuda_peak if kind == "cuda" else _cpu_peak
    if free_fn is None:
        free_fn = (lambda: _cuda_free(device)) if kind == "cuda" else _cpu_free
    requires = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    probes = []
    try:
        for batch in _probe_batches(usable, sizes):
            graph = atoms_to_graph(batch, model.cutoff, fidelity=fidelity, dtype=dtype).to(device=device)
            probes.append((graph.num_atoms, graph.num_edges, peak_fn(model, graph)))
            del graph
        free = int(free_fn())
    except Exception as exc:  # noqa: BLE001 - no measurement (no /proc, a structure the model rejects, OOM...)
        log.warning("batch budget: no memory measurement on %s (%s: %s); using %d atoms", device,
                    type(exc).__name__, exc, fallback.max_atoms)
        return fallback
    finally:
        for p, r in zip(model.parameters(), requires):
            p.requires_grad_(r)
        model.train(was_training)
    budget = budget_from_probes(probes, free, fraction, device=str(device), method=f"{kind}-peak" if kind == "cuda"
                                else "cpu-peak-rss", cap_atoms=cpu_cap if kind == "cpu" else None,
                                min_atoms=max(len(a) for a in usable), noise_bytes=NOISE_BYTES[kind])
    log.info("batch budget on %s: %d atoms, %s edges (%.3f MB/atom, %s free, %s)", device, budget.max_atoms,
             budget.max_edges, (budget.bytes_per_atom or 0) / 1e6, f"{free / 1e9:.1f} GB", budget.limited_by)
    return budget


def _device_kind(device: torch.device) -> str:
    return "cuda" if device.type == "cuda" else "cpu"


def _graph_ok(atoms: Atoms, model: MFPotential) -> bool:
    try:
        model.species_index(torch.as_tensor(np.asarray(atoms.numbers), dtype=torch.long))
        cell = np.asarray(atoms.cell.array, dtype=float)
        finite = bool(np.isfinite(atoms.positions).all() and np.isfinite(cell).all())
        return finite and not (bool(np.all(atoms.pbc)) and abs(float(np.linalg.det(cell))) < 1e-8)
    except Exception:  # noqa: BLE001 - such structures fail in the relaxer, with their error
        return False
