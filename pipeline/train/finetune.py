"""Fine-tuning: grow a trained potential (ours or the imported SevenNet-MF-0) to new elements and fidelities,
copy its weights so that its existing fidelities predict exactly as before, and freeze parts of it.

Weight transfer is written by hand because neither e3nn nor torch resizes a layer: an e3nn ``Linear`` /
``TensorProduct`` keeps one weight block per instruction and scales it by a ``path_weight`` of 1/sqrt(fan-in),
so appending a species or fidelity one-hot row changes the fan-in of every block feeding the same output. Old
blocks are copied with the ratio of old to new path weights (outputs unchanged for old species and
fidelities, whose one-hot entries for the new rows are zero); a new fidelity's one-hot rows are copies of its
source fidelity's rows (its fidelity-conditioned weights start as the source's); new species rows keep their
fresh initialisation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import torch
from ase.data import chemical_symbols
from torch import nn

from pipeline.model.layers import FidelityLinear
from pipeline.model.potential import MFPotential
from pipeline.model.references import ElementReferences, fit_element_references

__all__ = ["FINETUNE_LR", "FREEZE_MODES", "apply_shift", "expand_model", "fit_shift", "freeze", "parse_new_fidelities", "source_offsets", "tie_fidelity_rows"]

#: 'none': train everything; 'fidelity': only the fidelity-conditioned linears and the readout
FREEZE_MODES = ("none", "fidelity")

#: learning rate for fine-tuning a pretrained checkpoint when none is given: SevenNet's own recipe for its
#: multi-fidelity models (``sevenn/presets/mf_ompa_fine_tune.yaml``: AdamW, lr 2e-4, batch 8). The from-scratch
#: default (5e-3) moves a pretrained model far from where it started within a few steps.
FINETUNE_LR = 2e-4


def parse_new_fidelities(items: Sequence[str] | Mapping[str, str] | None) -> dict[str, str]:
    """['gpaw-r2scan=r2scan', ...] (or a mapping) -> {new fidelity: source fidelity}, lower case."""
    if not items:
        return {}
    pairs = items.items() if isinstance(items, Mapping) else (str(x).partition("=")[::2] for x in items)
    out = {}
    for new, src in pairs:
        new, src = str(new).strip().lower(), str(src).strip().lower()
        if not new or not src:
            raise ValueError(f"new fidelity {new or '?'}={src or '?'}: expected NEW=SOURCE, e.g. gpaw-r2scan=r2scan")
        out[new] = src
    return out


def _copy_blocks(new_mod: nn.Module, old_mod: nn.Module) -> None:
    """Copy an e3nn Linear / TensorProduct block by block (overlapping leading rows, path-weight corrected)."""
    new_views = list(new_mod.weight_views(yield_instruction=True))
    old_views = list(old_mod.weight_views(yield_instruction=True))
    if len(new_views) != len(old_views):
        raise ValueError(f"cannot transfer weights: {len(old_views)} vs {len(new_views)} instructions")
    with torch.no_grad():
        for (_, ins_new, v_new), (_, ins_old, v_old) in zip(new_views, old_views):
            sl = tuple(slice(0, min(a, b)) for a, b in zip(v_new.shape, v_old.shape))
            v_new[sl] = v_old[sl] * (ins_old.path_weight / ins_new.path_weight)


def _fidelity_row_views(mod: FidelityLinear) -> Iterator[torch.Tensor]:
    """The weight views of a fidelity-conditioned linear whose first axis is the fidelity one-hot (row ``k`` =
    what fidelity ``k`` adds); none for a plain linear."""
    if not mod.num_fidelities:
        return
    fid_in = len(mod.irreps_in)  # the one-hot is the last input irrep
    for _, ins, view in mod.linear.weight_views(yield_instruction=True):
        if ins.i_in == fid_in:
            yield view


def _copy_fidelity_rows(new_mod: FidelityLinear, source_rows: Mapping[int, int]) -> None:
    """In a fidelity-conditioned linear, new fidelity row ``k`` := row ``source_rows[k]``."""
    with torch.no_grad():
        for view in _fidelity_row_views(new_mod):
            for k, src in source_rows.items():
                view[k] = view[src]


def fit_shift(numbers: Sequence[Sequence[int]], predicted: Sequence[float], labels: Sequence[float]) -> dict[str, float]:
    """Per-element energy shift (label - prediction, eV/atom) by the joint reference fit of
    :mod:`pipeline.model.references` on paired rows: a mean offset plus ridge-shrunk per-element deviations, so
    that a handful of structures still gives sensible values (an element without data gets the mean)."""
    nums = [list(z) for z in numbers]
    n = len(nums)
    refs = fit_element_references(nums + nums, [*predicted, *labels], ["model"] * n + ["target"] * n, None,
                                  [str(k) for k in range(n)] * 2, base="model")
    return {el: refs.energies["target"][el] - refs.energies["model"].get(el, 0.0) for el in refs.energies["target"]}


def apply_shift(shift: Mapping[str, float], numbers: Sequence[int]) -> float:
    """Total shift (eV) of a structure; elements without a value get the mean shift."""
    mean = float(np.mean(list(shift.values()))) if shift else 0.0
    return float(sum(shift.get(chemical_symbols[z], mean) for z in numbers))


def expand_model(
    source: MFPotential,
    elements: Sequence[int] = (),
    new_fidelities: Mapping[str, str] | None = None,
    references: ElementReferences | None = None,
    offsets: Mapping[str, Mapping[str, float]] | None = None,
) -> MFPotential:
    """A copy of ``source`` with ``elements`` not yet known appended (sorted) and fidelities appended
    (``new_fidelities``: new name -> the existing fidelity it starts from).

    Existing fidelities and elements keep the source's weights, references and scale (so their predictions are
    unchanged before the first step); a new fidelity gets its source's weights and scale and the element
    references ``references`` gives it, or, when ``offsets[new]`` is given (element -> eV/atom, see
    :func:`fit_shift`), its source's references plus those offsets (it then starts as "source + per-element
    shift"); new elements get ``references``' values (estimated for fidelities the fit did not cover, see
    :meth:`ElementReferences.shift_matrix`)."""
    new_fidelities = dict(new_fidelities or {})
    old_cfg = source.config
    for new, src in new_fidelities.items():
        if new in old_cfg.fidelities:
            raise ValueError(f"new fidelity {new!r} already in the checkpoint ({', '.join(old_cfg.fidelities)})")
        if src not in old_cfg.fidelities:
            raise ValueError(f"new fidelity {new}={src}: {src!r} is not a fidelity of the checkpoint "
                             f"({', '.join(old_cfg.fidelities)})")
    add_z = sorted({int(z) for z in elements} - set(old_cfg.elements))
    cfg = dataclasses.replace(old_cfg, elements=(*old_cfg.elements, *add_z),
                              fidelities=(*old_cfg.fidelities, *new_fidelities))
    model = MFPotential(cfg).to(dtype=source.shift.dtype, device=source.shift.device)
    old_modules = dict(source.named_modules())
    for name, mod in model.named_modules():
        old = old_modules.get(name)
        if old is None:
            raise ValueError(f"cannot transfer weights: module {name!r} missing in the source")
        if hasattr(mod, "weight_views") and hasattr(mod, "instructions"):
            _copy_blocks(mod, old)
    old_params = dict(source.named_parameters())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if old_params[name].shape == p.shape:
                p.copy_(old_params[name])  # blocks copied above are identical in shape too when unchanged
    rows = {len(old_cfg.fidelities) + j: old_cfg.fidelities.index(src) for j, src in enumerate(new_fidelities.values())}
    for mod in model.modules():
        if isinstance(mod, FidelityLinear) and mod.num_fidelities:
            _copy_fidelity_rows(mod, rows)

    # references: source values where they exist, the fit for new rows / columns
    fitted = references.shift_matrix(cfg.fidelities, cfg.elements) if references is not None else None
    shift = torch.zeros_like(model.shift)
    scale = torch.ones_like(model.scale)
    n_f, n_e = len(old_cfg.fidelities), len(old_cfg.elements)
    if fitted is not None:
        shift.copy_(torch.as_tensor(fitted, dtype=shift.dtype))
    shift[:n_f, :n_e] = source.shift
    scale[:n_f, :n_e] = source.scale
    scale[:n_f, n_e:] = source.scale[:, :1]
    new_names = list(new_fidelities)
    for k, src in rows.items():
        scale[k] = scale[src]
        off = (offsets or {}).get(new_names[k - n_f])
        if fitted is None or off is not None:
            shift[k, :n_e] = shift[src, :n_e]
        if off is not None:
            mean = float(np.mean(list(off.values()))) if off else 0.0
            for b, z in enumerate(old_cfg.elements):
                shift[k, b] += off.get(chemical_symbols[z], mean)
    with torch.no_grad():
        model.shift.copy_(shift)
        model.scale.copy_(scale)
    return model


def source_offsets(source: MFPotential, frames: pa.Table, new_fidelities: Mapping[str, str],
                   limit: int = 64) -> dict[str, dict[str, float]]:
    """For each new fidelity with energy-labelled frames (at most ``limit``, in table order, only elements the
    source knows): :func:`fit_shift` of its labels against the source fidelity's predictions."""
    from pipeline.train.evaluation import predict

    out: dict[str, dict[str, float]] = {}
    known = set(source.elements)
    rows = frames.to_pylist()
    for new, src in new_fidelities.items():
        mine = [r for r in rows if r["fidelity"] == new and r["has_energy"] and set(r["numbers"]) <= known][:limit]
        if not mine:
            continue
        preds = predict([(source, src)], pa.Table.from_pylist(mine, schema=frames.schema))
        out[new] = fit_shift([r["numbers"] for r in mine], [p["energy"] for p in preds], [r["energy"] for r in mine])
    return out


def tie_fidelity_rows(model: MFPotential, source: int = 0) -> None:
    """Make every fidelity's one-hot rows equal to fidelity ``source``'s in all fidelity-conditioned linears."""
    rows = {k: source for k in range(len(model.fidelities)) if k != source}
    for mod in model.modules():
        if isinstance(mod, FidelityLinear) and mod.num_fidelities:
            _copy_fidelity_rows(mod, rows)


def fidelity_gap_penalty(model: MFPotential) -> torch.Tensor:
    """Sum over every fidelity-conditioned linear of ``||row_k - mean_k row_k||^2``: how far the fidelities' one-hot
    rows have moved apart.

    Added to the loss times ``TrainConfig.fidelity_prior``, it is a Gaussian prior saying that the fidelities are
    one function up to their references plus a *small* structure-dependent difference (the weight-space twin of
    the ridge prior of :mod:`pipeline.model.references`): a fidelity with a handful of labels moves its rows only
    as far as its data pay for, while the plentiful fidelity, anchored by its data, barely moves. Zero for a
    model with one fidelity. Written here because no library has a notion of fidelity rows in e3nn linears."""
    total = model.shift.new_zeros(())
    for mod in model.modules():
        if isinstance(mod, FidelityLinear) and mod.num_fidelities > 1:
            for view in _fidelity_row_views(mod):
                rows = view.reshape(view.shape[0], -1)
                total = total + (rows - rows.mean(dim=0, keepdim=True)).pow(2).sum()
    return total


def freeze(model: MFPotential, mode: str) -> list[str]:
    """Switch off gradients per ``mode`` (see :data:`FREEZE_MODES`); returns the names still trained."""
    if mode not in FREEZE_MODES:
        raise ValueError(f"freeze must be one of {FREEZE_MODES}, got {mode!r}")
    trainable = set()
    if mode == "none":
        trainable = {n for n, _ in model.named_parameters()}
    else:
        for name, mod in model.named_modules():
            if (isinstance(mod, FidelityLinear) and mod.num_fidelities) or name.startswith("readout"):
                trainable |= {f"{name}.{n}" if name else n for n, _ in mod.named_parameters()}
    for name, p in model.named_parameters():
        p.requires_grad_(name in trainable)
    return sorted(trainable)
