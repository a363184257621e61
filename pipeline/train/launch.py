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

import dataclasses
import os
import re
import subprocess
import sys
import threading
from collections.abc import Sequence

__all__ = ["launch", "resolve_devices", "torchrun_command", "train_argv", "under_torchrun"]

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


#: TrainConfig field -> mfhull train option, for the fields a launcher passes on (see :func:`train_argv`)
_FLAGS = {"epochs": "--epochs", "max_steps": "--max-steps", "batch_size": "--batch-size", "lr": "--lr",
          "seed": "--seed", "device": "--device", "val_fraction": "--val-fraction", "ema_decay": "--ema-decay",
          "warmup_steps": "--warmup-steps", "scheduler": "--scheduler", "target_fidelity": "--target-fidelity",
          "loss": "--loss", "max_atoms": "--max-atoms", "max_edges": "--max-edges", "accumulate": "--accumulate",
          "precision": "--precision", "num_workers": "--workers", "checkpoint_every": "--checkpoint-every"}


def train_argv(frames: str, out: str, preset: str, cfg, devices: int = 1) -> list[str]:
    """``mfhull train`` arguments that rebuild ``cfg`` (a :class:`~pipeline.train.trainer.TrainConfig`) in every
    rank; fields outside :data:`_FLAGS`, label policy, sampling weights and stream aside, must be at their
    defaults (ValueError naming them otherwise)."""
    from pipeline.train.trainer import TrainConfig

    default = TrainConfig()
    argv = ["train", "--frames", str(frames), "--out", str(out), "--preset", preset, "--devices", str(devices)]
    for name, flag in _FLAGS.items():
        value = getattr(cfg, name)
        if value is not None and value != getattr(default, name):
            argv += [flag, str(value)]
    for fid, labels in (cfg.label_policy or {}).items():
        argv += ["--labels", f"{fid}={','.join(labels)}"]
    for fid, w in (cfg.sampling_weights or {}).items():
        argv += ["--sampling-weight", f"{fid}={w}"]
    if cfg.stream is not None:
        argv.append("--stream" if cfg.stream else "--no-stream")
    handled = {*_FLAGS, "label_policy", "sampling_weights", "stream"}
    other = [f.name for f in dataclasses.fields(cfg) if f.name not in handled
             and getattr(cfg, f.name) != getattr(default, f.name)]
    if other:
        raise ValueError(f"cannot pass {other} to the training processes; set them in a --config file")
    return argv


def resolve_devices(devices: int, device: str) -> int:
    """``devices`` if > 0; 0 = every visible GPU when ``device`` is CUDA, else 1."""
    if devices > 0:
        return devices
    if str(device).startswith("cuda"):
        import torch

        return max(torch.cuda.device_count(), 1)
    return 1
