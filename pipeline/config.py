"""Typed settings: paths, the MP API key (from the environment, never printed), device, fidelities."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]


class Secret:
    """An API key that never shows its value: not a ``str``, so ``json.dumps``, ``"..." + key``, f-strings,
    ``str``/``repr``, ``%`` and ``format`` all give ``********`` or raise ``TypeError``; only :meth:`reveal`
    returns the value (to hand it to the client library)."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        object.__setattr__(self, "_value", str(value.reveal() if isinstance(value, Secret) else value))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("Secret is read-only")

    def __repr__(self) -> str:
        return "Secret('********')"

    def __str__(self) -> str:
        return "********"

    def __format__(self, spec: str) -> str:
        return "********"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(("Secret", self._value))

    def __bool__(self) -> bool:
        return bool(self._value)

    def __copy__(self) -> Secret:
        return self

    def __deepcopy__(self, memo: dict) -> Secret:
        return self

    def __reduce__(self) -> tuple:
        raise TypeError("a Secret cannot be pickled")

    def reveal(self) -> str:
        return self._value


def mp_api_key(env: dict[str, str] | None = None) -> Secret | None:
    """MP_API_KEY from the environment (or ``env``), wrapped so that it cannot leak through logs."""
    value = (env if env is not None else os.environ).get("MP_API_KEY", "").strip()
    return Secret(value) if value else None


def shared_data_dir() -> Path:
    """The read-only real MP data beside the checkout (``../shared/data/mp``), or MFHULL_SHARED_DATA."""
    return Path(os.environ.get("MFHULL_SHARED_DATA", PROJECT_ROOT.parent / "shared" / "data" / "mp"))


@dataclass
class Settings:
    """Where things live and which device/fidelities to use."""

    data_dir: Path = field(default_factory=lambda: PROJECT_ROOT / "data")
    reports_dir: Path = field(default_factory=lambda: Path(os.environ.get("MFHULL_REPORTS", PROJECT_ROOT / "reports")))
    device: str = field(default_factory=lambda: os.environ.get("MFHULL_DEVICE", "cpu"))
    fidelities: tuple[str, ...] = ("pbe", "r2scan")

    @property
    def demo_dir(self) -> Path:
        return self.data_dir / "demo"
