"""Thread settings that degrade gracefully on a shared machine.

Measured on the project's 2-core machine (issue 9): with one other busy process, a demo training epoch took 3-4 s
with torch's default threads and 0.65 s with one thread; OpenMP threads spin-wait while a sibling is
descheduled, so oversubscription turns a slowdown into a crawl. The rules here:

* threads come from the CPUs this process may run on (``os.sched_getaffinity``, which honours taskset and
  cgroup cpusets), less the ones other processes keep busy (1-minute load average), never below one;
* ``OMP_WAIT_POLICY=PASSIVE`` (idle OpenMP threads sleep instead of spinning) - set before torch starts its
  OpenMP runtime, i.e. by :func:`set_env_defaults` at the top of the CLI;
* a small model (fewer than ``SMALL_MODEL_PARAMS`` parameters: per-op work too small to split) uses one thread;
* ``MFHULL_THREADS=N`` overrides everything (``MFHULL_THREADS=auto`` or unset: the rules above).

``benchmarks/bench_threads.py`` prints the loaded/idle time ratio of these settings against torch's defaults.
"""

from __future__ import annotations

import logging
import os
from collections.abc import MutableMapping

log = logging.getLogger(__name__)

#: Models with fewer parameters than this run on one thread (the 'small' preset has ~2e4).
SMALL_MODEL_PARAMS = 200_000
ENV_THREADS = "MFHULL_THREADS"


def available_cpus() -> int:
    """CPUs this process may run on (affinity mask / cpuset), not the machine's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def busy_cpus() -> float:
    """CPUs kept busy by other processes: the 1-minute load average (0 when unknown)."""
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):
        return 0.0


def override(env: MutableMapping[str, str] | None = None) -> int | None:
    """MFHULL_THREADS as an int >= 1, None when unset or 'auto'; ValueError naming the setting otherwise."""
    value = (os.environ if env is None else env).get(ENV_THREADS, "").strip().lower()
    if value in ("", "auto"):
        return None
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{ENV_THREADS}={value!r}: expected a whole number >= 1 or 'auto'")
    return int(value)


def choose_threads(n_params: int | None = None, *, cpus: int | None = None, busy: float | None = None,
                   env: MutableMapping[str, str] | None = None) -> int:
    """Number of intra-op threads for a model of ``n_params`` parameters (None: unknown, not small)."""
    forced = override(env)
    if forced is not None:
        return forced
    if n_params is not None and n_params < SMALL_MODEL_PARAMS:
        return 1
    cpus = available_cpus() if cpus is None else cpus
    busy = busy_cpus() if busy is None else busy
    # the load average counts this process too when it is already running: leave it one CPU of its own
    return max(1, min(cpus, int(cpus - max(0.0, busy - 1.0) + 0.5)))


def set_env_defaults(env: MutableMapping[str, str] | None = None) -> None:
    """Before torch/numpy start: passive OpenMP waiting; MFHULL_THREADS also sets OMP_NUM_THREADS."""
    env = os.environ if env is None else env
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    forced = override(env)
    if forced is not None:
        env.setdefault("OMP_NUM_THREADS", str(forced))


def configure_torch_threads(n_params: int | None = None) -> int:
    """Set torch's intra-op threads by :func:`choose_threads` (inter-op: 1); return the number set."""
    import torch

    n = choose_threads(n_params)
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set, or parallel work has started: keep it
        pass
    log.info("torch threads: %d (cpus available %d, busy %.1f)", n, available_cpus(), busy_cpus())
    return n
