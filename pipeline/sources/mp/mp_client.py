"""The Materials Project client the ingestion depends on: a small protocol, its mp-api implementation, retries.

:class:`MPClient` names the three calls the ingestion makes. :class:`MPResterClient` implements them over
``mp_api.client.MPRester`` (or any object shaped like it, such as the tests' fake built from recorded MP
documents), with exactly the mp-api calls of mp-api 0.46.5:

* ``get_entries_in_chemsys(chemsys, additional_criteria={"thermo_types": [thermo_type]})``: thermo entries of the
  system and all its subsystems, with final structures;
* ``materials.search(material_ids=[...], fields=["material_id", "calc_types"])``: task id -> calc type of each
  material;
* ``materials.tasks.get_trajectory(task_id)``: a dumped emmet ``RelaxTrajectory`` (per-step coordinates, lattices,
  energies, forces and kBar stresses). ``materials.tasks.search`` returns ``CoreTaskDoc`` objects, which have no
  ionic steps in this mp-api version, so trajectories are the way to the forces and stresses.

Errors: mp-api turns HTTP failures into ``MPRestError("... error status code 429 ...")`` and wraps most
``requests`` exceptions the same way; :func:`classify_error` reads both shapes. A rejected or missing key is an
:class:`MPAuthError` (never retried); 429, 5xx, timeouts, dropped connections and truncated bodies are retried by
:func:`call_with_retries` with capped exponential backoff and jitter.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar

from pymatgen.core.entries import ComputedStructureEntry

from pipeline.config import Secret, mp_api_key
from pipeline.sources.mp.taskdocs import IncompleteRecord, enum_text, field_value

log = logging.getLogger(__name__)
T = TypeVar("T")

ErrorKind = Literal["auth", "transient", "permanent"]

MISSING_KEY = (
    "No Materials Project API key: set the MP_API_KEY environment variable "
    "(get a key at https://materialsproject.org/api)."
)


class MPAuthError(RuntimeError):
    """The Materials Project API key is missing or was rejected; retrying cannot help."""


class RetriesExhausted(RuntimeError):
    """A transient failure (rate limit, server error, timeout...) persisted through every retry."""


class MPUnreachable(ConnectionError):
    """The Materials Project (or the configured endpoint) did not answer in time or refused the connection."""


#: Default limit of one network call (s). mp-api and requests call without a timeout (mp-api 0.46.5's
#: heartbeat, every search), so a server that accepts and never answers would block forever.
DEFAULT_TIMEOUT = 60.0


def call_with_deadline(fn: Callable[[], T], timeout: float | None, what: str) -> T:
    """``fn()`` run in a daemon thread; ``TimeoutError`` when it has not returned after ``timeout`` seconds.

    Written by hand because neither requests nor mp-api bounds a call made without a ``timeout`` argument and
    mp-api gives no way to pass one. The abandoned thread is a daemon: it cannot keep the process alive."""
    if timeout is None:
        return fn()
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            box["error"] = exc

    worker = threading.Thread(target=target, name=f"mp-call:{what}", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise TimeoutError(f"{what}: timed out after {timeout:g} s without an answer")
    if "error" in box:
        raise box["error"]
    return box["value"]


class MPClient(Protocol):
    """The Materials Project calls the ingestion makes."""

    def thermo_entries(self, chemsys: str, thermo_type: str) -> list[ComputedStructureEntry]:
        """Entries (with structures) of ``chemsys`` and all its subsystems, for one MP thermo type."""
        ...

    def material_calc_types(self, material_ids: Sequence[str]) -> dict[str, dict[str, str]]:
        """material id -> {task id: calc type, e.g. 'GGA+U Structure Optimization'}."""
        ...

    def trajectory(self, task_id: str) -> dict[str, Any]:
        """The ionic trajectory of one task (a dumped emmet ``RelaxTrajectory``)."""
        ...


class MPResterClient:
    """:class:`MPClient` over an mp-api ``MPRester`` (or an object with the same methods)."""

    def __init__(self, rester: Any, secrets: Sequence[Secret] = ()):
        self.rester = rester
        self.secrets = tuple(secrets)  # values to redact from messages (Secret: never shown by str/repr)

    @classmethod
    def from_key(
        cls,
        key: Secret | str | None = None,
        *,
        rester_factory: Callable[..., Any] | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        **kwargs: Any,
    ) -> MPResterClient:
        """Open an ``MPRester`` with ``key`` (default: MP_API_KEY). Raises :class:`MPAuthError` if it is missing
        or refused, :class:`MPUnreachable` if the endpoint does not answer within ``timeout`` seconds or refuses
        the connection. ``rester_factory`` defaults to ``mp_api.client.MPRester`` (tests pass a fake)."""
        key = key if key is not None else mp_api_key()
        if not key:
            raise MPAuthError(MISSING_KEY)
        plain = key.reveal() if isinstance(key, Secret) else str(key)
        if rester_factory is None:
            from mp_api.client import MPRester as rester_factory

            # mp-api reads MP_API_ENDPOINT once, when it is first imported: pass it at call time instead
            if os.environ.get("MP_API_ENDPOINT"):
                kwargs.setdefault("endpoint", os.environ["MP_API_ENDPOINT"])
        kwargs.setdefault("mute_progress_bars", True)
        try:
            rester = call_with_deadline(lambda: rester_factory(api_key=plain, **kwargs), timeout,
                                        "connecting to the Materials Project")
        except Exception as exc:
            kind = classify_error(exc)
            if kind == "auth":
                raise MPAuthError(auth_message(exc, plain)) from None
            if kind == "transient":
                first = redact(str(exc), plain).strip().splitlines()
                raise MPUnreachable(f"cannot reach the Materials Project ({type(exc).__name__}: "
                                    f"{first[0][:200] if first else ''})") from None
            raise
        return cls(rester, secrets=(Secret(plain),))

    def thermo_entries(self, chemsys: str, thermo_type: str) -> list[ComputedStructureEntry]:
        entries = self.rester.get_entries_in_chemsys(
            chemsys, additional_criteria={"thermo_types": [thermo_type]}
        )
        return list(entries)

    def material_calc_types(self, material_ids: Sequence[str]) -> dict[str, dict[str, str]]:
        docs = self.rester.materials.search(
            material_ids=list(material_ids), fields=["material_id", "calc_types"]
        )
        out: dict[str, dict[str, str]] = {}
        for doc in docs:
            mid = enum_text(field_value(doc, "material_id"))
            calc_types = field_value(doc, "calc_types") or {}
            out[str(mid)] = {str(enum_text(t)): str(enum_text(c)) for t, c in calc_types.items()}
        return out

    def trajectory(self, task_id: str) -> dict[str, Any]:
        traj = self.rester.materials.tasks.get_trajectory(task_id)
        return traj.model_dump() if hasattr(traj, "model_dump") else dict(traj)


_STATUS_PATTERNS = (
    re.compile(r"status code (\d{3})"),
    re.compile(r"too many (\d{3}) error responses"),
    re.compile(r"\b(\d{3}) (?:Client|Server) Error"),
)
_TRANSIENT_TEXT = (
    "timed out",
    "timeout",
    "max retries exceeded",
    "connection aborted",
    "connection reset",
    "connection refused",
    "remotedisconnected",
    "temporarily unavailable",
    "incompleteread",
    "chunkedencodingerror",
)
_AUTH_TEXT = ("valid api key", "api key is invalid", "invalid api key", "unauthorized", "forbidden")


def http_status(exc: BaseException) -> int | None:
    """HTTP status of a failed request: from ``exc.response.status_code`` or from mp-api's error message."""
    response = getattr(exc, "response", None)
    code = getattr(response, "status_code", None) or getattr(exc, "status_code", None)
    if isinstance(code, int):
        return code
    text = str(exc)
    for pattern in _STATUS_PATTERNS:
        m = pattern.search(text)
        if m:
            return int(m.group(1))
    return None


def classify_error(exc: BaseException) -> ErrorKind:
    """auth (401/403, bad key: fail fast), transient (429, 5xx, 408, timeouts, connection errors, a truncated
    body or document: retry) or permanent (everything else: record it and move on)."""
    if isinstance(exc, MPAuthError):
        return "auth"
    status = http_status(exc)
    if status in (401, 403):
        return "auth"
    if status is not None:
        return "transient" if status in (408, 425, 429) or status >= 500 else "permanent"
    if isinstance(exc, (TimeoutError, ConnectionError, json.JSONDecodeError, IncompleteRecord)):
        return "transient"
    try:
        import requests

        if isinstance(
            exc, (requests.Timeout, requests.ConnectionError, requests.exceptions.ChunkedEncodingError)
        ):
            return "transient"
    except ImportError:  # pragma: no cover - requests comes with mp-api
        pass
    text = str(exc).lower()
    if any(t in text for t in _AUTH_TEXT):
        return "auth"
    if any(t in text for t in _TRANSIENT_TEXT):
        return "transient"
    return "permanent"


def redact(text: str, *secrets: str | None) -> str:
    """``text`` with every secret value replaced by asterisks."""
    for secret in secrets:
        value = secret.reveal() if isinstance(secret, Secret) else secret
        if value:
            text = text.replace(value, "********")
    return text


def auth_message(exc: BaseException, *secrets: str | None) -> str:
    status = http_status(exc)
    what = f"HTTP {status}" if status else type(exc).__name__
    return (
        f"The Materials Project refused the API key ({what}: {redact(str(exc), *secrets)[:200]}). "
        "Set MP_API_KEY to a valid key from https://materialsproject.org/api."
    )


@dataclass
class RetryPolicy:
    """Capped exponential backoff with jitter: attempt ``n`` (0-based) waits
    ``min(max_delay, base_delay * 2**n) * (1 - jitter * u)``, ``u`` uniform in [0, 1).

    ``sleep`` is injectable so tests run without waiting; ``seed`` makes the jitter reproducible.
    """

    max_attempts: int = 6
    base_delay: float = 1.0
    max_delay: float = 60.0
    jitter: float = 0.5
    sleep: Callable[[float], None] = time.sleep
    seed: int | None = None
    #: limit of each attempt (s), see :func:`call_with_deadline`; None waits forever
    timeout: float | None = DEFAULT_TIMEOUT
    _rng: random.Random = field(init=False, repr=False)
    _lock: threading.Lock = field(init=False, repr=False, default_factory=threading.Lock)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if not 0 <= self.jitter <= 1:
            raise ValueError("jitter must be in [0, 1]")
        if self.timeout is not None and not self.timeout > 0:
            raise ValueError("timeout must be > 0 seconds (or None)")
        self._rng = random.Random(self.seed)

    def delay(self, attempt: int) -> float:
        with self._lock:
            u = self._rng.random()
        return min(self.max_delay, self.base_delay * 2**attempt) * (1 - self.jitter * u)


def call_with_retries(
    fn: Callable[[], T], *, what: str, policy: RetryPolicy, secrets: Sequence[str | None] = ()
) -> T:
    """Call ``fn`` until it succeeds; retry transient failures per ``policy``.

    Raises :class:`MPAuthError` at once on an auth failure, re-raises a permanent failure unchanged, and raises
    :class:`RetriesExhausted` when the transient failures outlast ``policy.max_attempts``.
    """
    for attempt in range(policy.max_attempts):
        try:
            return call_with_deadline(fn, policy.timeout, what)
        except Exception as exc:
            kind = classify_error(exc)
            if kind == "auth":
                raise MPAuthError(auth_message(exc, *secrets)) from None
            if kind == "permanent":
                raise
            message = redact(f"{type(exc).__name__}: {exc}", *secrets)
            if attempt + 1 == policy.max_attempts:
                raise RetriesExhausted(
                    f"{what}: gave up after {policy.max_attempts} attempts; last: {message}"
                ) from None
            wait = policy.delay(attempt)
            log.warning(
                "%s: attempt %d failed (%s); retrying in %.2f s", what, attempt + 1, message[:300], wait
            )
            policy.sleep(wait)
    raise AssertionError("unreachable")  # pragma: no cover
