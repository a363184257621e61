"""Import SevenNet checkpoints (e.g. the SevenNet-MF-0 shipped in the ``sevenn`` wheel) into :class:`MFPotential`.

The project's model uses SevenNet's layer layout (e3nn irreps, instruction order, where the fidelity one-hot is
concatenated), so importing is a renaming of weights plus a translation of the config. Only the architectures
this project implements are accepted (NequIP interaction, bessel basis, XPLOR or polynomial cutoff, linear or
nequip self-connection, linear readout, no biases); anything else raises ``ValueError`` naming the setting.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ase.data import chemical_symbols
from e3nn import o3
from numpy._core.multiarray import _reconstruct as _np_reconstruct

from pipeline.model.config import ModelConfig
from pipeline.model.potential import MFPotential
from pipeline.model.references import ElementReferences

__all__ = ["config_from_sevenn", "import_sevenn", "load_sevenn_checkpoint", "sevenn_checkpoint_path"]

_PRETRAINED = {
    "7net-mf-0": ("SevenNet_MF_0", "checkpoint_sevennet_mf_0.pth"),
    "7net-0": ("SevenNet_0__11Jul2024", "checkpoint_sevennet_0.pth"),
}


def sevenn_checkpoint_path(name: str = "7net-mf-0") -> Path:
    """Path of a checkpoint shipped inside the installed ``sevenn`` package ('7net-mf-0', '7net-0')."""
    try:
        import sevenn
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("sevenn is not installed: `pip install sevenn` to import its checkpoints") from exc
    if name not in _PRETRAINED:
        raise KeyError(f"unknown SevenNet checkpoint {name!r}; known: {', '.join(_PRETRAINED)}")
    folder, file = _PRETRAINED[name]
    path = Path(sevenn.__file__).parent / "pretrained_potentials" / folder / file
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found in the installed sevenn package")
    return path


#: The only globals a SevenNet checkpoint may name: numpy arrays in its config (measured with
#: ``torch.serialization.get_unsafe_globals_in_checkpoint`` on SevenNet-0 and SevenNet-MF-0). Anything else
#: (a function, a class with ``__reduce__``) is refused instead of run.
_SEVENN_SAFE_GLOBALS: list[Any] = [
    (_np_reconstruct, "numpy.core.multiarray._reconstruct"),
    (_np_reconstruct, "numpy._core.multiarray._reconstruct"),
    np.ndarray,
    np.dtype,
    *(type(np.dtype(t)) for t in ("float64", "float32", "float16", "int64", "int32", "int16", "int8", "uint8",
                                   "bool", "complex128", "complex64")),
]


def load_sevenn_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a SevenNet checkpoint with ``torch.load(weights_only=True)`` and an explicit allow-list of globals.

    Nothing in the file is executed: a pickle naming any other global (a crafted payload) raises ``ValueError``
    naming the file and the global; so do truncated or non-checkpoint files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SevenNet checkpoint {path}: no such file (shipped names: {', '.join(_PRETRAINED)})")
    try:
        with torch.serialization.safe_globals(_SEVENN_SAFE_GLOBALS):
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"unsupported GLOBAL:? (?:GLOBAL )?([\w.]+)", str(exc), re.IGNORECASE)
        if found is None:
            raise ValueError(f"SevenNet checkpoint {path}: not a readable torch checkpoint (corrupt pickle)") from exc
        raise ValueError(f"SevenNet checkpoint {path}: refused, it names the global {found.group(1)}, which is not "
                         "on the allow-list of safe globals (loading it could run code)") from exc
    except Exception as exc:
        raise ValueError(f"SevenNet checkpoint {path}: not a readable torch checkpoint "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc
    if not isinstance(raw, dict) or "config" not in raw or "model_state_dict" not in raw:
        raise ValueError(f"SevenNet checkpoint {path}: not a SevenNet checkpoint (no 'config'/'model_state_dict')")
    return raw


def _plain(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


def _require(cfg: dict[str, Any], key: str, allowed: Any) -> None:
    value = cfg.get(key)
    ok = value in allowed if isinstance(allowed, (list, tuple, set)) else value == allowed
    if not ok:
        raise ValueError(f"unsupported SevenNet setting {key}={value!r} (supported: {allowed!r})")


def config_from_sevenn(
    cfg: dict[str, Any], fidelity_name: str = "pbe", state: dict[str, torch.Tensor] | None = None
) -> ModelConfig:
    """Translate a SevenNet config dict into a :class:`ModelConfig`.

    Modality names become fidelity names in lower case ('PBE' -> 'pbe', 'R2SCAN' -> 'r2scan'); a model without
    modalities gets the single fidelity ``fidelity_name``. Old configs without ``conv_denominator`` take it from
    the weights (``state``)."""
    _require(cfg, "interaction_type", ("nequip", None))
    _require(cfg, "use_bias_in_linear", False)
    _require(cfg, "readout_as_fcn", False)
    _require(cfg, "act_radial", "silu")
    _require(cfg, "self_connection_type", ("linear", "nequip"))
    if cfg.get("act_scalar", {"e": "silu", "o": "tanh"}) != {"e": "silu", "o": "tanh"} or cfg.get(
        "act_gate", {"e": "silu", "o": "tanh"}
    ) != {"e": "silu", "o": "tanh"}:
        raise ValueError("unsupported SevenNet activations (only silu for even, tanh for odd)")
    rb = cfg["radial_basis"]
    if rb.get("radial_basis_name") != "bessel":
        raise ValueError(f"unsupported radial basis {rb!r}")
    cf = cfg["cutoff_function"]
    if cf.get("cutoff_function_name") == "XPLOR":
        cutoff_kw: dict[str, Any] = {"cutoff_function": "xplor", "cutoff_on": float(cf["cutoff_on"])}
    elif cf.get("cutoff_function_name") == "poly_cut":
        cutoff_kw = {"cutoff_function": "polynomial", "poly_p": int(cf.get("poly_cut_p_value", 6))}
    else:
        raise ValueError(f"unsupported cutoff function {cf!r}")
    if int(cfg.get("lmax_edge", -1)) > 0 or int(cfg.get("lmax_node", -1)) > 0:
        raise ValueError("separate lmax_edge / lmax_node are not supported")
    num_layers = int(cfg["num_convolution_layer"])
    channels = int(cfg["channel"])
    hidden = None
    manual = cfg.get("irreps_manual", False)
    if manual is not False and manual is not None:
        manual = [str(m) for m in manual]
        middle = set(manual[1:-1])
        if manual[0] != f"{channels}x0e" or manual[-1] != f"{channels}x0e" or len(middle) > 1:
            raise ValueError(f"unsupported irreps_manual {manual}")
        hidden = middle.pop() if middle else None
    denominators = cfg.get("conv_denominator")
    if denominators is None and state is not None:
        denominators = [float(state[f"{t}_convolution.denominator"].reshape(-1)[0]) for t in range(num_layers)]
    if denominators is None:
        raise ValueError("the SevenNet config has no conv_denominator (pass the weights as `state`)")
    denominators = [float(d) for d in (denominators if isinstance(denominators, list) else [denominators])]
    if len(set(denominators)) != 1:
        raise ValueError(f"per-layer conv_denominator differs: {denominators}")
    type_map = {int(z): int(i) for z, i in cfg["_type_map"].items()}
    elements = tuple(sorted(type_map, key=type_map.get))
    fidelity_in: list[str] = []
    if cfg.get("use_modality", False):
        modal_map = {str(k): int(v) for k, v in cfg["_modal_map"].items()}
        fidelities = tuple(k.lower() for k in sorted(modal_map, key=modal_map.get))
        for key, name in (
            ("use_modal_node_embedding", "embedding"),
            ("use_modal_self_inter_intro", "pre_conv"),
            ("use_modal_self_inter_outro", "post_conv"),
            ("use_modal_output_block", "readout"),
        ):
            if cfg.get(key, False):
                fidelity_in.append(name)
    else:
        fidelities = (fidelity_name,)
    return ModelConfig(
        elements=elements,
        fidelities=fidelities,
        cutoff=float(cfg["cutoff"]),
        channels=channels,
        lmax=int(cfg["lmax"]),
        num_layers=num_layers,
        hidden_irreps=hidden,
        parity=bool(cfg["is_parity"]),
        num_radial_basis=int(rb.get("bessel_basis_num", 8)),
        trainable_radial_basis=bool(rb.get("train_radial_basis", True)),
        radial_hidden=tuple(int(h) for h in cfg["weight_nn_hidden_neurons"]),
        avg_num_neighbors=denominators[0],
        self_connection=str(cfg["self_connection_type"]),
        fidelity_in=tuple(fidelity_in),
        **cutoff_kw,
    )


def _weight_map(config: ModelConfig) -> dict[str, str]:
    """Our parameter name -> SevenNet state-dict key."""
    names = {
        "radial_basis.freq": "edge_embedding.basis_function.coeffs",
        "embedding.linear.weight": "onehot_to_feature_x.linear.weight",
        "readout_hidden.linear.weight": "reduce_input_to_hidden.linear.weight",
        "readout_out.linear.weight": "reduce_hidden_to_energy.linear.weight",
    }
    sc = "linear.weight" if config.self_connection == "linear" else "fc_tensor_product.weight"
    for t in range(config.num_layers):
        names[f"blocks.{t}.self_connection.weight"] = f"{t}_self_connection_intro.{sc}"
        names[f"blocks.{t}.pre.linear.weight"] = f"{t}_self_interaction_1.linear.weight"
        names[f"blocks.{t}.post.linear.weight"] = f"{t}_self_interaction_2.linear.weight"
        for k in range(len(config.radial_hidden) + 1):
            names[f"blocks.{t}.conv.radial_mlp.layer{k}.weight"] = f"{t}_convolution.weight_nn.layer{k}.weight"
    return names


def _version(cfg: dict[str, Any]) -> tuple[int, int, int]:
    parts = str(cfg.get("version", "0.0.0")).split(".")[:3]
    return tuple(int("".join(ch for ch in p if ch.isdigit()) or 0) for p in parts)  # type: ignore[return-value]


def _radial_columns_from_old_layout(model: MFPotential, state: dict[str, torch.Tensor], t: int) -> torch.Tensor:
    """Last radial-MLP weight of layer ``t`` converted from the SevenNet < 0.11 layout.

    Old checkpoints keep the tensor-product paths in creation order (ours are sorted by output irrep) and some of
    their Wigner-3j blocks have the opposite sign of e3nn's current ``wigner_3j``; the path weights are moved to
    the sorted order and negated where the sign differs, which leaves every message unchanged."""
    conv = model.blocks[t].conv
    n_last = len(model.config.radial_hidden)
    weight = state[f"{t}_convolution.weight_nn.layer{n_last}.weight"]
    irreps_in, irreps_sh, irreps_mid = conv.tp.irreps_in1, conv.tp.irreps_in2, conv.tp.irreps_out
    blocks: dict[tuple[int, int, int], torch.Tensor] = {}
    start = 0
    for i1, i2, io, _, _ in conv.instructions_created:
        numel = irreps_in[i1].mul
        block = weight[:, start:start + numel]
        start += numel
        l1, l2, l3 = irreps_in[i1].ir.l, irreps_sh[i2].ir.l, irreps_mid[io].ir.l
        key = f"{t}_convolution.convolution._compiled_main_left_right._w3j_{l1}_{l2}_{l3}"
        if l1 > 0 and l2 > 0 and l3 > 0 and key in state:
            now = o3.wigner_3j(l1, l2, l3).to(state[key].dtype)
            if not torch.allclose(state[key], now, atol=1e-6):
                if not torch.allclose(state[key], -now, atol=1e-6):
                    raise ValueError(f"{key}: stored Wigner-3j matches neither sign of e3nn's")
                block = -block
        blocks[(i1, i2, io)] = block
    if start != weight.shape[1]:
        raise ValueError(f"layer {t}: radial MLP has {weight.shape[1]} outputs, paths need {start}")
    order = sorted(conv.instructions_created, key=lambda ins: ins[2])
    return torch.cat([blocks[(a, b, c)] for a, b, c, _, _ in order], dim=1)


def _shift_scale(state: dict[str, torch.Tensor], config: ModelConfig) -> tuple[ElementReferences, np.ndarray]:
    """Shift per (fidelity, element) and scale per (fidelity, element), broadcast from SevenNet's layouts."""
    nf, ns = len(config.fidelities), len(config.elements)
    shift = np.asarray(_plain(state["rescale_atomic_energy.shift"]), dtype=float)
    scale = np.asarray(_plain(state["rescale_atomic_energy.scale"]), dtype=float)
    shift = np.broadcast_to(shift.reshape(-1, ns) if shift.size != 1 else shift.reshape(1, 1), (nf, ns))
    scale = np.broadcast_to(scale.reshape(-1, ns) if scale.size != 1 else scale.reshape(1, 1), (nf, ns))
    symbols = [chemical_symbols[z] for z in config.elements]
    energies = {f: dict(zip(symbols, shift[a].tolist())) for a, f in enumerate(config.fidelities)}
    return ElementReferences(energies, {f: float(scale[a, 0]) for a, f in enumerate(config.fidelities)}), scale


def import_sevenn(
    checkpoint: str | Path = "7net-mf-0", dtype: torch.dtype = torch.float32, fidelity_name: str = "pbe"
) -> MFPotential:
    """Build an :class:`MFPotential` carrying the weights of a SevenNet checkpoint (a path or a shipped name)."""
    path = sevenn_checkpoint_path(str(checkpoint)) if str(checkpoint) in _PRETRAINED else Path(checkpoint)
    raw = load_sevenn_checkpoint(path)
    cfg, state = raw["config"], raw["model_state_dict"]
    config = config_from_sevenn(cfg, fidelity_name=fidelity_name, state=state)
    model = MFPotential(config)
    ours = dict(model.named_parameters())
    mapping = _weight_map(config)
    missing = sorted(set(ours) - set(mapping))
    if missing:
        raise ValueError(f"no SevenNet weights for parameters: {missing}")
    with torch.no_grad():
        for name, key in mapping.items():
            if key not in state:
                raise ValueError(f"SevenNet checkpoint {path} lacks {key}")
            src = state[key]
            if tuple(src.shape) != tuple(ours[name].shape):
                raise ValueError(f"shape mismatch {key} {tuple(src.shape)} -> {name} {tuple(ours[name].shape)}")
            ours[name].copy_(src)
        version = str(cfg.get("version", ""))
        if _version(cfg) < (0, 11, 0) or version.startswith("0.11.0") and "dev0" in version:
            n_last = len(config.radial_hidden)
            for t in range(config.num_layers):
                ours[f"blocks.{t}.conv.radial_mlp.layer{n_last}.weight"].copy_(
                    _radial_columns_from_old_layout(model, state, t)
                )
        for t in range(config.num_layers):
            den = float(state[f"{t}_convolution.denominator"].reshape(-1)[0])
            if not np.isclose(den, config.avg_num_neighbors, rtol=1e-6):
                raise ValueError(f"layer {t} denominator {den} differs from config {config.avg_num_neighbors}")
        refs, scale = _shift_scale(state, config)
        model.set_references(refs)
        model.scale.copy_(torch.tensor(np.array(scale, dtype=float), dtype=model.scale.dtype))
    return model.to(dtype)
