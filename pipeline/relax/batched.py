"""Relax many structures at once with an :class:`~pipeline.model.MFPotential`: batched FIRE + Frechet cell filter
(:mod:`pipeline.relax.fire`), autobatching under an atom/edge budget, neighbour lists with a skin.

How a run goes: structures wait in a queue; the batch is filled up to ``max_atoms`` atoms and ``max_edges``
neighbour pairs (``max_atoms="auto"``: measured on the device first, :func:`resolve_budget`); one model call gives
energy, forces and stress of the whole batch; a structure leaves the batch when it converges (filter fmax <
``fmax``), reaches ``steps`` or fails, and the next ones in the queue take its place. Neighbour lists (vesin, :func:`pipeline.graphs.neighbor_list`) are built with ``cutoff + skin`` and
rebuilt for a structure only when its atoms may have moved more than half a skin relative to each other (a
bound that includes the cell change); every step keeps only the pairs inside the cutoff, so the model sees exactly
the graph a fresh neighbour list would give.

Failures are results, never exceptions: unknown elements and unusable cells before the start; NaN/inf, forces
above ``max_force`` and a volume outside ``volume_range`` x the initial one during the run (the same guards as the
ASE path, :func:`pipeline.relax.guards.check_guards`). A model call that raises is retried one structure at a
time, so only the structures that break it fail.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from ase import Atoms

from pipeline.graphs import Graph, neighbor_list
from pipeline.model.potential import MFPotential
from pipeline.relax.autobatch import BatchBudget, estimate_batch_budget
from pipeline.relax.fire import (
    FireParams,
    FireState,
    concat_states,
    dof_forces,
    filter_fmax,
    fire_init,
    fire_step,
    select_state,
)
from pipeline.relax.guards import GuardError, check_guards
from pipeline.relax.settings import DEFAULT_SETTINGS, RelaxSettings
from pipeline.relax.symmetry import SymmetryOps, symmetry_ops

__all__ = ["RelaxResult", "relax_batched", "resolve_budget"]


@dataclass
class RelaxResult:
    """Outcome of one structure: status 'converged', 'not_converged' or 'failed' (with ``error``)."""

    index: int
    status: str
    atoms: Atoms | None = None
    energy: float | None = None
    fmax: float | None = None
    smax: float | None = None
    n_steps: int | None = None
    error: str | None = None
    wall_s: float = 0.0


@dataclass
class _Job:
    index: int
    atoms: Atoms
    numbers: torch.Tensor
    relax_cell: bool
    volume0: float
    n_edges: int
    sym: SymmetryOps | None
    started: float
    n_steps: int = 0
    edges: tuple[torch.Tensor, torch.Tensor] | None = None  # (2, E) local index, (E, 3) shifts, cutoff + skin
    ref: tuple[np.ndarray, np.ndarray] | None = None  # positions and cell at the last neighbour-list build


def _prepare(index: int, atoms: Atoms, model: MFPotential, opts: RelaxSettings) -> _Job:
    sym = None
    if opts.symmetry and bool(np.all(atoms.pbc)):
        atoms, sym = symmetry_ops(atoms, opts.symprec)
    numbers = torch.as_tensor(np.asarray(atoms.numbers), dtype=torch.long)
    model.species_index(numbers)  # UnknownElementError naming the elements
    pos, cell = np.asarray(atoms.positions, float), np.asarray(atoms.cell.array, float)
    if len(numbers) == 0:
        raise ValueError("structure with no atoms")
    if not (np.isfinite(pos).all() and np.isfinite(cell).all()):
        raise ValueError("positions or cell contain NaN or inf")
    periodic = bool(np.all(atoms.pbc))
    volume = abs(float(np.linalg.det(cell))) if periodic else 0.0
    if periodic and volume < 1e-8:
        raise ValueError("periodic cell with zero volume")
    n_edges = len(neighbor_list(pos, cell, atoms.pbc, model.cutoff)[0])
    return _Job(index, atoms, numbers, opts.relax_cell and periodic, volume, n_edges, sym, time.perf_counter())


def _needs_rebuild(job: _Job, pos: np.ndarray, cell: np.ndarray, cutoff: float, skin: float) -> bool:
    if job.ref is None:
        return True
    pos0, cell0 = job.ref
    moved = float(np.linalg.norm(pos - pos0, axis=1).max())
    if not np.all(job.atoms.pbc):
        return 2.0 * moved > skin
    strain = float(np.linalg.norm(np.linalg.solve(cell0, cell - cell0), 2))
    span = float(np.linalg.norm(np.ptp(pos0, axis=0))) + float(np.linalg.norm(cell0.sum(0)))
    return 2.0 * moved + strain * (cutoff + 2.0 * skin + span) > skin


def _build(job: _Job, pos: np.ndarray, cell: np.ndarray, cutoff: float, skin: float, device: torch.device) -> None:
    i, j, s = neighbor_list(pos, cell, job.atoms.pbc, cutoff + skin)
    job.edges = (torch.from_numpy(np.stack([i, j])).to(device), torch.from_numpy(s).to(device))
    job.ref = (pos.copy(), cell.copy())


def _graph(jobs: Sequence[_Job], state: FireState, model: MFPotential, fidelity: int, skin: float) -> Graph:
    """Graph of the current positions with only the pairs inside the cutoff."""
    positions, cell = state.positions, state.cell
    pos_np, cell_np = positions.detach().cpu().double().numpy(), cell.detach().cpu().double().numpy()
    offsets = np.concatenate([[0], np.cumsum([len(j.numbers) for j in jobs])])
    for k, job in enumerate(jobs):
        p = pos_np[offsets[k]:offsets[k + 1]]
        if _needs_rebuild(job, p, cell_np[k], model.cutoff, skin):
            _build(job, p, cell_np[k], model.cutoff, skin, positions.device)
    edge_index = torch.cat([job.edges[0] + int(offsets[k]) for k, job in enumerate(jobs)], dim=1)
    shift = torch.cat([job.edges[1] for job in jobs]).to(positions.dtype)
    center, neighbor = edge_index
    vec = positions[neighbor] - positions[center] + torch.bmm(shift.unsqueeze(1), cell[state.batch[center]]).squeeze(1)
    inside = torch.linalg.norm(vec, dim=1) < model.cutoff
    device = positions.device
    pbc = torch.tensor(np.array([np.asarray(j.atoms.pbc, bool) for j in jobs]), device=device)
    return Graph(
        numbers=torch.cat([j.numbers for j in jobs]).to(device), positions=positions.detach(),
        cell=torch.where(pbc[:, :, None], cell, torch.zeros_like(cell)).detach(), pbc=pbc, batch=state.batch,
        edge_index=edge_index[:, inside], edge_shift=shift[inside],
        fidelity=torch.full((len(jobs),), fidelity, dtype=torch.long, device=device),
        n_atoms=state.n_atoms, cutoff=model.cutoff,
    )


def _evaluate(model: MFPotential, graph: Graph) -> dict[str, torch.Tensor]:
    out = model(graph, compute_forces=True, compute_stress=True, create_graph=False)
    stress = out["stress"].detach()
    return {"energy": out["energy"].detach(), "forces": out["forces"].detach(), "stress": 0.5 * (stress + stress.transpose(1, 2))}


def _symmetrize(jobs: Sequence[_Job], state: FireState, forces: torch.Tensor, stress: torch.Tensor) -> None:
    """In place: spglib-symmetrised forces and stress (ASE FixSymmetry's rank-1 and rank-2 averages)."""
    offsets = np.concatenate([[0], np.cumsum([len(j.numbers) for j in jobs])])
    cell = state.cell.detach().cpu().double().numpy()
    for k, job in enumerate(jobs):
        if job.sym is None:
            continue
        sl = slice(int(offsets[k]), int(offsets[k + 1]))
        f, s = job.sym.apply(cell[k], forces[sl].cpu().double().numpy(), stress[k].cpu().double().numpy())
        forces[sl] = torch.as_tensor(f, dtype=forces.dtype, device=forces.device)
        stress[k] = torch.as_tensor(s, dtype=stress.dtype, device=stress.device)


def _final_atoms(job: _Job, positions: np.ndarray, cell: np.ndarray) -> Atoms:
    atoms = job.atoms.copy()
    atoms.calc = None
    if np.all(job.atoms.pbc):
        atoms.set_cell(cell, scale_atoms=False)
    atoms.set_positions(positions)
    return atoms


def _init_state(job: _Job, dtype: torch.dtype, device: torch.device, params: FireParams) -> FireState:
    pos = torch.as_tensor(np.asarray(job.atoms.positions), dtype=dtype, device=device)
    cell = torch.as_tensor(np.asarray(job.atoms.cell.array), dtype=dtype, device=device)[None]
    batch = torch.zeros(len(pos), dtype=torch.long, device=device)
    return fire_init(pos, cell, batch, torch.tensor([job.relax_cell], device=device), params)


def resolve_budget(structures: Sequence[Atoms], model: MFPotential, fidelity: int,
                   opts: RelaxSettings) -> tuple[RelaxSettings, BatchBudget | None]:
    """``opts`` with a numeric batch budget: ``max_atoms="auto"`` is replaced by the budget measured for these
    structures on the model's device (and ``max_edges`` by the measured edge budget unless one is set); the
    measurement is returned with it (None when the budget was given)."""
    if opts.max_atoms != "auto":
        return opts, None
    budget = estimate_batch_budget(structures, model, fidelity)
    max_edges = opts.max_edges if opts.max_edges is not None else budget.max_edges
    return dataclasses.replace(opts, max_atoms=budget.max_atoms, max_edges=max_edges), budget


def relax_batched(
    structures: Sequence[Atoms],
    model: MFPotential,
    fidelity: int,
    opts: RelaxSettings = DEFAULT_SETTINGS,
    *,
    on_progress: Callable[[int], None] | None = None,
) -> Iterator[RelaxResult]:
    """Relax ``structures`` with ``model`` at fidelity index ``fidelity``; yields one :class:`RelaxResult` per
    input (in the order they finish; ``index`` is the input position). ``on_progress(n)``: n more are done.

    Runs in the model's dtype and on its device. ``wall_s`` of a result is the time it spent in the batch
    (shared with the structures batched alongside it)."""
    param = model.shift
    dtype, device = param.dtype, param.device
    requires = [p.requires_grad for p in model.parameters()]
    model.eval()
    for p in model.parameters():  # no weight gradients: the autograd graph keeps only what forces/stress need
        p.requires_grad_(False)
    try:
        yield from _run(structures, model, fidelity, opts, dtype, device, on_progress)
    finally:
        for p, r in zip(model.parameters(), requires):
            p.requires_grad_(r)


def _run(structures, model, fidelity, opts, dtype, device, on_progress) -> Iterator[RelaxResult]:
    def done(result: RelaxResult) -> RelaxResult:
        if on_progress is not None:
            on_progress(1)
        return result

    queue: deque[_Job] = deque()
    for index, atoms in enumerate(structures):
        try:
            queue.append(_prepare(index, atoms, model, opts))
        except Exception as exc:  # noqa: BLE001 - a bad structure is a failed result, the rest carry on
            yield done(RelaxResult(index, "failed", error=f"{type(exc).__name__}: {exc}"))
    if queue:
        opts, _ = resolve_budget([j.atoms for j in queue], model, fidelity, opts)
    max_edges = opts.max_edges
    jobs: list[_Job] = []
    state: FireState | None = None
    while queue or jobs:
        added = []
        n_atoms = sum(len(j.numbers) for j in jobs)
        n_edges = sum(j.n_edges for j in jobs)
        while queue:
            nxt = queue[0]
            fits = n_atoms + len(nxt.numbers) <= opts.max_atoms and (
                max_edges is None or n_edges + nxt.n_edges <= max_edges)
            if (jobs or added) and not fits:
                break
            job = queue.popleft()
            job.started = time.perf_counter()
            added.append(job)
            n_atoms += len(job.numbers)
            n_edges += job.n_edges
        if added:
            new = [_init_state(j, dtype, device, opts.fire) for j in added]
            state = concat_states(([state] if state is not None else []) + new)
            jobs.extend(added)
        assert state is not None
        try:
            out = _evaluate(model, _graph(jobs, state, model, fidelity, opts.skin))
        except Exception as exc:  # noqa: BLE001 - find the structures that break the model call
            if len(jobs) == 1:
                bad = [0]
                errors = {0: exc}
            else:
                errors = {}
                for k, job in enumerate(jobs):
                    one = select_state(state, torch.arange(len(jobs), device=device) == k)
                    try:
                        _evaluate(model, _graph([job], one, model, fidelity, opts.skin))
                    except Exception as one_exc:  # noqa: BLE001
                        errors[k] = one_exc
                bad = sorted(errors) or list(range(len(jobs)))
            for k in bad:
                err = errors.get(k, exc)
                yield done(RelaxResult(jobs[k].index, "failed", n_steps=jobs[k].n_steps,
                                       error=f"{type(err).__name__}: {err}",
                                       wall_s=time.perf_counter() - jobs[k].started))
            keep = torch.ones(len(jobs), dtype=torch.bool, device=device)
            keep[bad] = False
            jobs = [j for k, j in enumerate(jobs) if keep[k]]
            state = select_state(state, keep) if jobs else None
            continue
        forces, stress, energy = out["forces"], out["stress"], out["energy"]
        _symmetrize(jobs, state, forces, stress)
        stress = torch.where(state.relax_cell[:, None, None], stress, torch.zeros_like(stress))
        f_atoms, f_cell = dof_forces(state, forces, stress)
        fmax = filter_fmax(state, f_atoms, f_cell)
        cell = state.cell
        volume = torch.linalg.det(cell).abs()
        force_norm = torch.linalg.norm(forces, dim=1)
        raw_max = torch.zeros_like(fmax).scatter_reduce(0, state.batch, force_norm, reduce="amax", include_self=True)
        finite = torch.isfinite(energy) & torch.isfinite(fmax) & torch.isfinite(raw_max)
        host = {k: v.cpu().double().numpy() for k, v in
                {"e": energy, "fmax": fmax, "raw": raw_max, "vol": volume, "finite": finite.to(dtype),
                 "smax": stress.abs().amax(dim=(1, 2))}.items()}
        finished = torch.zeros(len(jobs), dtype=torch.bool, device=device)
        pos_np = cell_np = None
        offsets = np.concatenate([[0], np.cumsum([len(j.numbers) for j in jobs])])
        for k, job in enumerate(jobs):
            error = None
            try:
                check_guards(
                    finite=bool(host["finite"][k]), max_force=float(host["raw"][k]), volume=float(host["vol"][k]),
                    volume0=job.volume0 if job.relax_cell else None, opts=opts, step=job.n_steps,
                )
            except GuardError as exc:
                error = f"{type(exc).__name__}: {exc}"
            converged = error is None and host["fmax"][k] < opts.fmax
            if error is None and not converged and job.n_steps < opts.steps:
                continue
            finished[k] = True
            if error is not None:
                result = RelaxResult(job.index, "failed", n_steps=job.n_steps, error=error)
            else:
                if pos_np is None:
                    pos_np = state.positions.detach().cpu().double().numpy()
                    cell_np = cell.detach().cpu().double().numpy()
                result = RelaxResult(
                    job.index, "converged" if converged else "not_converged",
                    atoms=_final_atoms(job, pos_np[offsets[k]:offsets[k + 1]], cell_np[k]),
                    energy=float(host["e"][k]), fmax=float(host["fmax"][k]),
                    smax=float(host["smax"][k]) if job.relax_cell else None, n_steps=job.n_steps,
                )
            result.wall_s = time.perf_counter() - job.started
            yield done(result)
        running = ~finished
        state = fire_step(state, f_atoms, f_cell, running, opts.fire)
        for k, job in enumerate(jobs):
            if not finished[k]:
                job.n_steps += 1
        if bool(finished.any()):
            jobs = [j for k, j in enumerate(jobs) if not finished[k]]
            state = select_state(state, running) if jobs else None
