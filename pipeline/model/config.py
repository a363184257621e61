"""Typed hyper-parameters of the multi-fidelity potential, stored in every checkpoint, with named presets.

The architecture follows SevenNet(-MF) (Kim et al., arXiv 2409.07947; NequIP-style interaction blocks):
one-hot species -> linear embedding -> ``num_layers`` x [self-connection linear, fidelity-conditioned linear,
e3nn tensor-product convolution / avg_num_neighbors, fidelity-conditioned linear, + self-connection, gate]
-> fidelity-conditioned linear readout -> per-atom energy * scale + shift[fidelity, element] -> sum.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from ase.data import atomic_numbers, chemical_symbols

__all__ = ["PRESETS", "ModelConfig", "preset"]


def _all_elements() -> tuple[int, ...]:
    return tuple(range(1, 95))  # H..Pu


@dataclass(frozen=True)
class ModelConfig:
    """All hyper-parameters; plain types only so that a checkpoint loads with ``weights_only=True``.

    elements: atomic numbers (or symbols) in one-hot order. fidelities: fidelity names in one-hot order (lower case).
    hidden_irreps: node features between layers; None -> ``channels`` copies of every l <= lmax (parity
    as set by ``parity``). The first layer's input and the last layer's output are ``channels`` scalars.
    cutoff_function: 'xplor' (smooth switch from ``cutoff_on`` to ``cutoff``) or 'polynomial' (``poly_p``).
    fidelity_in: where the fidelity one-hot is concatenated: any of 'embedding', 'pre_conv', 'post_conv',
    'readout'. self_connection: 'linear' or 'nequip' (tensor product with the species one-hot).
    """

    elements: tuple[int, ...] = field(default_factory=_all_elements)
    fidelities: tuple[str, ...] = ("pbe", "r2scan")
    cutoff: float = 5.0
    channels: int = 128
    lmax: int = 2
    num_layers: int = 5
    hidden_irreps: str | None = None
    parity: bool = False
    num_radial_basis: int = 8
    trainable_radial_basis: bool = True
    radial_hidden: tuple[int, ...] = (64, 64)
    cutoff_function: str = "xplor"
    cutoff_on: float = 4.5
    poly_p: int = 6
    avg_num_neighbors: float = 1.0
    self_connection: str = "linear"
    fidelity_in: tuple[str, ...] = ("pre_conv", "post_conv", "readout")
    readout_hidden: int | None = None
    version: int = 1

    def __post_init__(self) -> None:
        try:
            zs = tuple(atomic_numbers[z] if isinstance(z, str) else int(z) for z in self.elements)
        except KeyError as exc:
            raise ValueError(f"unknown element symbol {exc.args[0]!r} in elements") from exc
        object.__setattr__(self, "elements", zs)
        object.__setattr__(self, "fidelities", tuple(str(f).strip().lower() for f in self.fidelities))
        object.__setattr__(self, "radial_hidden", tuple(int(h) for h in self.radial_hidden))
        object.__setattr__(self, "fidelity_in", tuple(self.fidelity_in))
        if not self.elements or len(set(self.elements)) != len(self.elements):
            raise ValueError("elements must be a non-empty list of distinct atomic numbers")
        if any(z < 1 or z >= len(chemical_symbols) for z in self.elements):
            raise ValueError(f"unknown atomic number in elements: {self.elements}")
        if not self.fidelities or len(set(self.fidelities)) != len(self.fidelities):
            raise ValueError(f"fidelities must be distinct and non-empty, got {self.fidelities}")
        if self.cutoff <= 0 or self.channels <= 0 or self.num_layers <= 0 or self.lmax < 0:
            raise ValueError("cutoff, channels and num_layers must be positive and lmax >= 0")
        if self.cutoff_function not in ("xplor", "polynomial"):
            raise ValueError(f"cutoff_function must be 'xplor' or 'polynomial', got {self.cutoff_function!r}")
        if self.cutoff_function == "xplor" and not 0 < self.cutoff_on < self.cutoff:
            raise ValueError(f"cutoff_on ({self.cutoff_on}) must lie in (0, cutoff={self.cutoff})")
        if self.self_connection not in ("linear", "nequip"):
            raise ValueError(f"self_connection must be 'linear' or 'nequip', got {self.self_connection!r}")
        unknown = set(self.fidelity_in) - {"embedding", "pre_conv", "post_conv", "readout"}
        if unknown:
            raise ValueError(f"unknown fidelity_in entries: {sorted(unknown)}")
        if self.avg_num_neighbors <= 0:
            raise ValueError("avg_num_neighbors must be positive")

    @property
    def node_irreps(self) -> str:
        """Irreps of the hidden node features."""
        if self.hidden_irreps:
            return self.hidden_irreps
        parts = [f"{self.channels}x0e"]
        for ell in range(1, self.lmax + 1):
            if self.parity:  # O(3): both parities for l > 0
                parts += [f"{self.channels}x{ell}o", f"{self.channels}x{ell}e"]
            else:  # SO(3): every irrep labelled even (as SevenNet does with is_parity=False)
                parts.append(f"{self.channels}x{ell}e")
        return "+".join(parts)

    @property
    def element_symbols(self) -> list[str]:
        return [chemical_symbols[z] for z in self.elements]

    def with_elements(self, elements: list[str | int] | tuple[str | int, ...]) -> ModelConfig:
        """Copy with another element list (symbols or atomic numbers, kept in the given order)."""
        zs = tuple(atomic_numbers[e] if isinstance(e, str) else int(e) for e in elements)
        return replace(self, elements=zs)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key, value in d.items():
            if isinstance(value, tuple):
                d[key] = list(value)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f for f in cls.__dataclass_fields__}
        extra = set(data) - known
        if extra:
            raise ValueError(f"unknown model config fields: {sorted(extra)}")
        return cls(**data)


PRESETS: dict[str, dict[str, Any]] = {
    # Trains in minutes on a laptop CPU: tests and demos.
    "small": {
        "cutoff": 4.5, "channels": 16, "lmax": 1, "num_layers": 2, "num_radial_basis": 8, "radial_hidden": (16, 16),
        "cutoff_function": "polynomial", "avg_num_neighbors": 20.0,
    },
    # Sized for the multi-fidelity benchmark sets (<= 8-atom cells, a few hundred frames): on a set where
    # r2SCAN - PBE depends on structure, this size halved the small preset's MF error in one check (issue 10).
    "mf-bench": {
        "cutoff": 4.5, "channels": 32, "lmax": 2, "num_layers": 3, "num_radial_basis": 8, "radial_hidden": (32, 32),
        "cutoff_function": "polynomial", "avg_num_neighbors": 20.0,
    },
    # The published SevenNet-MF-0 architecture (sevenn 0.13.0 checkpoint 'checkpoint_sevennet_mf_0.pth').
    "sevennet-mf-0": {
        "cutoff": 5.0, "channels": 128, "lmax": 2, "num_layers": 5, "hidden_irreps": "128x0e+64x1e+32x2e",
        "parity": False, "num_radial_basis": 8, "radial_hidden": (64, 64), "cutoff_function": "xplor",
        "cutoff_on": 4.5, "avg_num_neighbors": 35.98957443237305, "self_connection": "linear",
        "fidelity_in": ("pre_conv", "post_conv", "readout"),
    },
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A named preset ('small', 'mf-bench' or 'sevennet-mf-0') with optional overrides (elements, fidelities, ...)."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})
