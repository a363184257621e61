"""Data-parallel training under ``torchrun``: process-group setup from the environment, DDP wrapping, rank-0-only
writes, barriers and a clean shutdown. Thin helpers over :mod:`torch.distributed`; no training logic here.

Launch (one node, N processes; ``torchrun`` sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT)::

    torchrun --standalone --nproc-per-node N my_training_script.py ...

and inside the script::

    with distributed() as ctx:                       # gloo on CPU, NCCL on CUDA; a no-op without torchrun
        model = wrap_model(MFPotential(cfg).to(ctx.device, torch.float64), ctx)
        stream = FrameStream(path, ..., rank=ctx.rank, world_size=ctx.world_size)
        for item in stream.iter_epoch(num_workers=2):
            ...  # forward/backward: DDP averages the gradients over ranks
            on_rank0(save_checkpoint, unwrap(model), path, extra={"stream": stream.state_dict()})

What is exact and what is not, when the world size changes with the *global* batch kept fixed (each rank gets
``1/W`` of it): DDP averages the per-rank gradients, so the step equals the single-process step on the union of
the ranks' batches exactly when every rank's loss is a mean over the same number of terms (same number of
structures and of atoms per rank, e.g. fixed-size batches of equal-sized frames); the results then agree to
floating-point rounding (the reduction order differs), not bit for bit. With atom/edge budget batches the ranks'
batches differ in size, the mean of per-rank means weights them differently, and runs at different world sizes
are only statistically equivalent. Resuming a :class:`~pipeline.train.stream.FrameStream` at another world size
continues with the same remaining global batches, grouped into steps differently.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__ = ["DistContext", "all_reduce_mean", "all_reduce_sum", "barrier", "distributed", "init_from_env", "is_rank0", "on_rank0",
           "shutdown", "unwrap", "wrap_model"]

T = TypeVar("T")
ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: rank, world size, local rank (GPU index on its node), device, backend
    (None when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None

    @property
    def is_distributed(self) -> bool:
        return self.backend is not None


def init_from_env(device: str | None = None, timeout_s: float = 600.0) -> DistContext:
    """Join the process group described by torchrun's environment variables.

    ``device``: 'cpu', 'cuda' or None (CUDA when available). The backend is NCCL on CUDA (each process takes
    GPU ``LOCAL_RANK``), gloo on CPU; with more ranks on a node than GPUs (``LOCAL_WORLD_SIZE``) the ranks share
    the GPUs round-robin over gloo (NCCL refuses two ranks on one GPU). Without ``WORLD_SIZE`` (or with 1) nothing is initialised and a
    single-process context is returned, so one script serves both launches. A half-set environment is an error
    naming the missing variables.
    """
    want_cuda = torch.cuda.is_available() if device is None else str(device).startswith("cuda")
    if want_cuda and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but CUDA is not available")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(f"cuda:{local_rank}" if want_cuda else "cpu")
    if world <= 1:
        if want_cuda:
            torch.cuda.set_device(dev)
        return DistContext(device=dev)
    missing = [k for k in ENV_KEYS if k not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={world} but {', '.join(missing)} not set: launch with torchrun")
    backend = "nccl" if want_cuda else "gloo"
    if want_cuda:
        n_gpu = torch.cuda.device_count()
        if n_gpu == 0:
            raise RuntimeError("device 'cuda' requested but no CUDA device is visible")
        if max(int(os.environ.get("LOCAL_WORLD_SIZE", "0")), local_rank + 1) > n_gpu:
            # more ranks than GPUs on this node (torchrun sets LOCAL_WORLD_SIZE; e.g. a smoke test of 2 ranks on
            # 1 GPU): they share the GPUs round-robin; NCCL refuses two ranks on one GPU, gloo all-reduces CUDA
            # tensors through the host
            dev, backend = torch.device(f"cuda:{local_rank % n_gpu}"), "gloo"
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {"device_id": dev} if backend == "nccl" else {}
        dist.init_process_group(backend, init_method="env://", timeout=datetime.timedelta(seconds=timeout_s),
                                **kwargs)
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, dev, backend)


def shutdown() -> None:
    """Leave the process group (after a barrier so that no rank exits while others still talk to it)."""
    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(RuntimeError):  # a peer already gone: nothing left to wait for
            dist.barrier()
        dist.destroy_process_group()


@contextlib.contextmanager
def distributed(device: str | None = None, timeout_s: float = 600.0) -> Iterator[DistContext]:
    """:func:`init_from_env` on entry, :func:`shutdown` on exit (also after an exception; a failing rank does
    not wait at the barrier for its peers, which then fail on their own timeout or torchrun stops them)."""
    ctx = init_from_env(device, timeout_s)
    try:
        yield ctx
    except BaseException:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        raise
    shutdown()


def wrap_model(model: nn.Module, ctx: DistContext, **ddp_kwargs: Any) -> nn.Module:
    """``model`` in DistributedDataParallel when distributed (on ``ctx.device``), unchanged otherwise.

    Forces and stress come from ``autograd.grad`` inside the forward (double backward in training); DDP
    all-reduces the parameter gradients of ``loss.backward()`` only. ``ddp_kwargs`` pass through (e.g.
    ``find_unused_parameters=True`` for a model with a fidelity head that a batch does not use)."""
    if not ctx.is_distributed:
        return model
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, **ddp_kwargs)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside a DDP wrapper (what a checkpoint stores)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def is_rank0() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def on_rank0(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
    """Run ``fn`` (e.g. a checkpoint write) on rank 0 only, then a barrier so no rank runs ahead of the write;
    returns ``fn``'s result on rank 0 and None elsewhere."""
    result = fn(*args, **kwargs) if is_rank0() else None
    barrier()
    return result


def all_reduce_mean(value: torch.Tensor | float) -> torch.Tensor:
    """Mean of a scalar or tensor over ranks (for logging losses and metrics); a copy, on the input's device."""
    t = torch.as_tensor(value).detach().clone()
    if not (dist.is_available() and dist.is_initialized()):
        return t
    home = t.device
    if dist.get_backend() == "nccl":  # NCCL reduces CUDA tensors only
        t = t.to(torch.device("cuda", torch.cuda.current_device()))
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return (t / dist.get_world_size()).to(home)


def all_reduce_sum(value: torch.Tensor | float) -> torch.Tensor:
    """Sum of a scalar or tensor over ranks (counts, metric sums); a copy, on the input's device."""
    t = torch.as_tensor(value).detach().clone()
    if not (dist.is_available() and dist.is_initialized()):
        return t
    home = t.device
    if dist.get_backend() == "nccl":
        t = t.to(torch.device("cuda", torch.cuda.current_device()))
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.to(home)
