"""Batched FIRE over atom positions and a Frechet cell filter: a state of batched tensors and pure functions.

The definitions are ASE's (``ase.optimize.FIRE`` + ``ase.filters.FrechetCellFilter``, ASE 3.29), written for
many structures at once so that both paths take the same steps and agree on convergence:

- degrees of freedom per structure: atom positions in the undeformed cell ``x = r F^-T`` and the cell variable
  ``n * log(F)``, with ``F`` the deformation gradient from the initial cell (``cell = cell0 F^T``) and ``n`` the
  number of atoms (ASE's ``exp_cell_factor``);
- generalised forces: ``f_atoms = forces F`` and ``f_cell = L(X^T, virial F^-T) / n`` with ``virial = -V stress``
  and ``L`` the Frechet derivative of the matrix exponential (the adjoint of ``L(X, .)`` is ``L(X^T, .)``, so one
  6x6 exponential per structure replaces ASE's nine ``expm_frechet`` calls);
- convergence: the largest row norm of ``[f_atoms; f_cell]`` (``n + 3`` rows) is below ``fmax``;
- FIRE: ASE's update with per-structure ``dt``, ``a`` and step counter, velocities mixed with the whole force
  vector of a structure, and the step of a structure capped at ``maxstep`` in the norm over all its DOFs.

torch-sim has a batched FIRE too; it is not a dependency of the library (it pins its own torch and its FIRE
variants differ from ASE's in details such as the step cap), hence this module. Pure functions: :func:`fire_init`
builds the state, :func:`dof_forces` maps model forces and stress to filter forces, :func:`fire_step` moves the
structures that are still running.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

__all__ = ["FireParams", "FireState", "concat_states", "dof_forces", "fire_init", "fire_step", "select_state"]


@dataclass(frozen=True)
class FireParams:
    """ASE FIRE's parameters and defaults."""

    dt: float = 0.1
    maxstep: float = 0.2
    dtmax: float = 1.0
    nmin: int = 5
    finc: float = 1.1
    fdec: float = 0.5
    astart: float = 0.1
    fa: float = 0.99
    a: float = 0.1


@dataclass
class FireState:
    """Structures being relaxed. Per atom (N): ``x`` (positions in the undeformed cell), ``velocity``,
    ``batch``. Per structure (B): ``cell0`` (initial cell), ``cell_dof`` (log of the deformation gradient,
    unscaled), ``cell_velocity`` (velocity of the scaled cell variable), ``relax_cell`` (bool), ``dt``, ``a``,
    ``n_pos`` (FIRE's steps since the last uphill move), ``started`` (False until the first step), ``n_atoms``."""

    x: torch.Tensor
    velocity: torch.Tensor
    batch: torch.Tensor
    cell0: torch.Tensor
    cell_dof: torch.Tensor
    cell_velocity: torch.Tensor
    relax_cell: torch.Tensor
    dt: torch.Tensor
    a: torch.Tensor
    n_pos: torch.Tensor
    started: torch.Tensor
    n_atoms: torch.Tensor

    @property
    def deform(self) -> torch.Tensor:
        """(B, 3, 3) deformation gradient ``F = exp(cell_dof)``."""
        return torch.linalg.matrix_exp(self.cell_dof)

    @property
    def cell(self) -> torch.Tensor:
        """(B, 3, 3) current cell, rows = lattice vectors: ``cell0 F^T``."""
        return self.cell0 @ self.deform.transpose(1, 2)

    @property
    def positions(self) -> torch.Tensor:
        """(N, 3) current Cartesian positions ``x F^T``."""
        return torch.bmm(self.x.unsqueeze(1), self.deform.transpose(1, 2)[self.batch]).squeeze(1)


_PER_ATOM = ("x", "velocity", "batch")


def fire_init(
    positions: torch.Tensor, cell: torch.Tensor, batch: torch.Tensor, relax_cell: torch.Tensor,
    params: FireParams = FireParams(),
) -> FireState:
    """State at the start: undeformed cell, zero velocities, ``dt`` and ``a`` at their initial values."""
    nb = cell.shape[0]
    opts = {"dtype": positions.dtype, "device": positions.device}
    n_atoms = torch.bincount(batch, minlength=nb)
    return FireState(
        x=positions.clone(), velocity=torch.zeros_like(positions), batch=batch, cell0=cell.clone(),
        cell_dof=torch.zeros_like(cell), cell_velocity=torch.zeros_like(cell), relax_cell=relax_cell.to(torch.bool),
        dt=torch.full((nb,), params.dt, **opts), a=torch.full((nb,), params.a, **opts),
        n_pos=torch.zeros(nb, dtype=torch.long, device=positions.device),
        started=torch.zeros(nb, dtype=torch.bool, device=positions.device), n_atoms=n_atoms,
    )


def _expm_frechet_adjoint(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``L(x^T, g)``: the gradient of ``<expm(x), g>`` w.r.t. ``x`` (upper-right block of a 6x6 exponential)."""
    nb = x.shape[0]
    block = torch.zeros(nb, 6, 6, dtype=x.dtype, device=x.device)
    xt = x.transpose(1, 2)
    block[:, :3, :3] = xt
    block[:, 3:, 3:] = xt
    block[:, :3, 3:] = g
    return torch.linalg.matrix_exp(block)[:, :3, 3:]


def dof_forces(state: FireState, forces: torch.Tensor, stress: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Filter forces: ``(N, 3)`` on the atom DOFs and ``(B, 3, 3)`` on the cell DOFs (zero where the cell is
    fixed). ``stress``: (B, 3, 3), ASE sign (eV/A^3), evaluated at the state's positions and cell."""
    deform = state.deform
    f_atoms = torch.bmm(forces.unsqueeze(1), deform[state.batch]).squeeze(1)
    cell = state.cell0 @ deform.transpose(1, 2)
    volume = torch.linalg.det(cell).abs()
    safe_stress = torch.where(state.relax_cell[:, None, None], stress, torch.zeros_like(stress))
    virial = -volume[:, None, None] * safe_stress
    ucf_grad = virial @ torch.linalg.inv(deform.transpose(1, 2))
    f_cell = _expm_frechet_adjoint(state.cell_dof, ucf_grad) / state.n_atoms.to(forces.dtype)[:, None, None]
    return f_atoms, torch.where(state.relax_cell[:, None, None], f_cell, torch.zeros_like(f_cell))


def _per_structure(values: torch.Tensor, batch: torch.Tensor, nb: int) -> torch.Tensor:
    return torch.zeros(nb, dtype=values.dtype, device=values.device).index_add_(0, batch, values)


def filter_fmax(state: FireState, f_atoms: torch.Tensor, f_cell: torch.Tensor) -> torch.Tensor:
    """(B,) largest row norm of the filter forces (ASE's ``gradient_norm`` over atoms and the three cell rows)."""
    nb = state.n_atoms.shape[0]
    atom_norm = torch.linalg.norm(f_atoms, dim=1)
    fmax = torch.zeros(nb, dtype=f_atoms.dtype, device=f_atoms.device).scatter_reduce(
        0, state.batch, atom_norm, reduce="amax", include_self=True)
    return torch.maximum(fmax, torch.linalg.norm(f_cell, dim=2).amax(dim=1))


def fire_step(
    state: FireState, f_atoms: torch.Tensor, f_cell: torch.Tensor, active: torch.Tensor,
    params: FireParams = FireParams(),
) -> FireState:
    """One ASE FIRE step for the structures where ``active`` (B,) is True; the others are returned unchanged."""
    nb, b = state.n_atoms.shape[0], state.batch
    # the cell variable ASE integrates is n * log(F); its velocity lives in that scaled space
    scale = state.n_atoms.to(f_atoms.dtype)[:, None, None]
    vf = _per_structure((f_atoms * state.velocity).sum(1), b, nb) + (f_cell * state.cell_velocity).sum((1, 2))
    ff = _per_structure((f_atoms * f_atoms).sum(1), b, nb) + (f_cell * f_cell).sum((1, 2))
    vv = _per_structure((state.velocity * state.velocity).sum(1), b, nb) + (state.cell_velocity ** 2).sum((1, 2))

    downhill = state.started & (vf > 0.0)
    reset = state.started & ~downhill
    mix = torch.where(downhill, state.a * torch.sqrt(vv) / torch.sqrt(ff).clamp_min(1e-300), torch.zeros_like(vv))
    keep = torch.where(downhill, 1.0 - state.a, torch.where(reset, 0.0, 1.0))
    vel = keep[b, None] * state.velocity + mix[b, None] * f_atoms
    cvel = keep[:, None, None] * state.cell_velocity + mix[:, None, None] * f_cell
    grow = downhill & (state.n_pos > params.nmin)
    dt = torch.where(grow, torch.clamp(state.dt * params.finc, max=params.dtmax), state.dt)
    dt = torch.where(reset, state.dt * params.fdec, dt)
    a = torch.where(grow, state.a * params.fa, torch.where(reset, torch.full_like(state.a, params.astart), state.a))
    n_pos = torch.where(downhill, state.n_pos + 1, torch.where(reset, torch.zeros_like(state.n_pos), state.n_pos))

    vel = vel + dt[b, None] * f_atoms
    cvel = cvel + dt[:, None, None] * f_cell
    dr = dt[b, None] * vel
    dc = dt[:, None, None] * cvel
    norm = torch.sqrt(_per_structure((dr * dr).sum(1), b, nb) + (dc * dc).sum((1, 2)))
    cap = torch.where(norm > params.maxstep, params.maxstep / norm.clamp_min(1e-300), torch.ones_like(norm))
    on_atoms = active[b, None]
    on = active[:, None, None]
    return replace(
        state,
        x=torch.where(on_atoms, state.x + cap[b, None] * dr, state.x),
        cell_dof=torch.where(on, state.cell_dof + cap[:, None, None] * dc / scale, state.cell_dof),
        velocity=torch.where(on_atoms, vel, state.velocity),
        cell_velocity=torch.where(on, cvel, state.cell_velocity),
        dt=torch.where(active, dt, state.dt), a=torch.where(active, a, state.a),
        n_pos=torch.where(active, n_pos, state.n_pos), started=state.started | active,
    )


def select_state(state: FireState, keep: torch.Tensor) -> FireState:
    """The structures where ``keep`` (B,) is True, atoms renumbered."""
    atom_keep = keep[state.batch]
    new_index = torch.cumsum(keep.long(), 0) - 1
    out = {}
    for f in fields(state):
        value = getattr(state, f.name)
        if f.name == "batch":
            out[f.name] = new_index[value[atom_keep]]
        elif f.name in _PER_ATOM:
            out[f.name] = value[atom_keep]
        else:
            out[f.name] = value[keep]
    return FireState(**out)


def concat_states(states: list[FireState]) -> FireState:
    """One state holding the structures of all ``states`` in order."""
    out = {}
    offset = 0
    batches = []
    for s in states:
        batches.append(s.batch + offset)
        offset += s.n_atoms.shape[0]
    for f in fields(FireState):
        out[f.name] = torch.cat(batches) if f.name == "batch" else torch.cat([getattr(s, f.name) for s in states])
    return FireState(**out)
