"""``mfhull train --devices N``: start N training processes on this node with torchrun (``torch.distributed.run``).

Each process runs the same ``mfhull train`` command line under torchrun's environment (RANK, WORLD_SIZE, ...);
:func:`pipeline.train.trainer.train` sees it, joins the process group (gloo on CPU, NCCL on CUDA, one GPU per
process: ``LOCAL_RANK``) and trains data-parallel on the streamed path. The same as running by hand::

    torchrun --standalone --nproc-per-node N -m pipeline.cli train --frames DIR --out DIR ...

Several nodes: run torchrun on each with ``--nnodes``, ``--node-rank`` and a rendezvous address instead of
``--standalone`` (docs/training-at-scale.md). The ranks print one-line errors; torchrun's own traceback of a
failed child is not shown unless ``-v``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from collections.abc import Sequence

__all__ = ["launch", "torchrun_command", "under_torchrun"]

#: torchrun's own log lines (glog format: level letter, MMDD, time, pid, file:line])
_TORCHRUN_LOG = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ torch/")


def under_torchrun() -> bool:
    """Whether this process was started by torchrun (or any launcher that sets WORLD_SIZE)."""
    return os.environ.get("WORLD_SIZE", "") not in ("", "1") or "TORCHELASTIC_RUN_ID" in os.environ


def torchrun_command(nproc: int, argv: Sequence[str]) -> list[str]:
    """The torchrun command line that runs ``mfhull <argv>`` in ``nproc`` processes on this node."""
    if nproc < 1:
        raise ValueError(f"--devices must be >= 1, got {nproc}")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            "-m", "pipeline.cli", *argv]


def launch(nproc: int, argv: Sequence[str], verbose: bool = False, cpu: bool = True) -> int:
    """Run ``mfhull <argv>`` under torchrun with ``nproc`` processes; returns the exit code.

    ``cpu``: each process gets ``OMP_NUM_THREADS`` = CPUs // nproc (at least 1) unless already set. The
    children's output passes through; torchrun's own report of a failed child (a traceback) is dropped unless
    ``verbose``, and a one-line error follows instead."""
    env = dict(os.environ)
    if cpu and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    env.setdefault("PYTHONUNBUFFERED", "1")
    proc = subprocess.Popen(torchrun_command(nproc, argv), env=env, stderr=subprocess.PIPE, text=True, bufsize=1)
    suppressed: list[str] = []

    def forward() -> None:
        hiding = False
        for line in proc.stderr:  # type: ignore[union-attr]
            if not verbose and _TORCHRUN_LOG.match(line):
                suppressed.append(line)
                continue
            if not verbose and (hiding or line.startswith("Traceback") or "torch.distributed.elastic" in line
                                or "ChildFailedError" in line):
                hiding = not line.startswith("mfhull ")
                if hiding:
                    suppressed.append(line)
                    continue
            sys.stderr.write(line)
            sys.stderr.flush()

    reader = threading.Thread(target=forward, daemon=True)
    reader.start()
    code = proc.wait()
    reader.join()
    if code != 0 and not verbose:
        print(f"mfhull train: error: {nproc}-process training failed (torchrun exit code {code}); "
              "the ranks' messages are above (-v shows torchrun's report)", file=sys.stderr)
    return code
