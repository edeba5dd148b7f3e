"""Device choice and multi-process (torchrun) set-up: gloo on CPU, nccl on CUDA.

``torchrun --nproc_per_node N -m qatlab.cli train ...`` sets ``WORLD_SIZE``/``RANK``/
``LOCAL_RANK``; :func:`setup` then joins the process group. Every rank trains on its shard of
each batch stream, evaluates the full validation set (same weights, same numbers), and only
rank 0 writes files.
"""

from __future__ import annotations

import atexit
import gc
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from qatlab.errors import ConfigError


@dataclass(frozen=True)
class Dist:
    """Where this process runs: its device, rank and the number of processes."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    owns_group: bool = False  # True if setup() created the process group (and should end it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(option: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> the GPU if there is one, else the CPU; ``cuda`` without a GPU is an error."""
    if option == "cpu":
        return torch.device("cpu")
    if option == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is cuda but no CUDA GPU is available; use cpu or auto")
    if option in ("cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if option == "auto":
        return torch.device("cpu")
    raise ConfigError(f"device must be auto, cpu or cuda; got {option!r}")


def setup(device_option: str = "auto") -> Dist:
    """Resolve the device and, under torchrun (``WORLD_SIZE>1``), join the process group."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    device = resolve_device(device_option, local_rank)
    if world_size <= 1:
        return Dist(device)
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    owns = False
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        owns = True
        # A run that raised leaves its DistributedDataParallel wrapper in reference cycles
        # (the traceback's frames); collected only at interpreter shutdown, its reducer's
        # destructor aborted the process (SIGABRT, 'terminate called without an active
        # exception') in about 1 run in 5. Collect while the interpreter is still whole.
        atexit.unregister(gc.collect)  # once, however many runs this process starts
        atexit.register(gc.collect)
    return Dist(device, dist.get_rank(), dist.get_world_size(), owns)


def teardown(info: Dist) -> None:
    """End the process group if :func:`setup` started it."""
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, info: Dist) -> torch.Tensor:
    """Sum ``tensor`` over all processes (in place); a no-op for one process."""
    if info.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def sync_buffers(module: torch.nn.Module, info: Dist) -> None:
    """Copy rank 0's buffers (BatchNorm statistics) to every rank.

    DDP broadcasts buffers at the start of each forward pass, so after the last training step
    of an epoch every rank holds statistics updated by its own shard; evaluation and
    checkpoints need one set.
    """
    if info.enabled:
        for buf in module.buffers():
            dist.broadcast(buf, src=0)


def broadcast_object(obj: Any, info: Dist) -> Any:
    """Rank 0's ``obj`` (picklable) on every rank; ``obj`` itself for one process. What every
    rank decides from (early stopping, best epoch, divergence) goes through here once an
    epoch, so no rank can stop while another waits for it in a collective."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(info: Dist) -> None:
    """Wait for every process (so no rank reads a checkpoint rank 0 is still writing)."""
    if info.enabled:
        dist.barrier()


def wrap_model(model: torch.nn.Module, info: Dist) -> torch.nn.Module:
    """``model`` in DistributedDataParallel when several processes train it, else itself.

    No per-forward buffer sync (``forward_sync_buffers``/``broadcast_buffers`` False): DDP's
    default broadcasts rank 0's buffers before every forward pass, which the loop does not
    need: synchronized BatchNorm keeps the running statistics equal on every rank, and
    :func:`sync_buffers` copies rank 0's at each epoch end (without sync BN, rank 0's
    statistics are the EMA of its own batches either way)."""
    if not info.enabled:
        return model
    import inspect

    ddp = torch.nn.parallel.DistributedDataParallel
    ids = [info.device.index] if info.device.type == "cuda" else None
    # newer torch names the option forward_sync_buffers (and deprecates broadcast_buffers)
    newer = "forward_sync_buffers" in inspect.signature(ddp.__init__).parameters
    no_sync = {"forward_sync_buffers" if newer else "broadcast_buffers": False}
    return ddp(model, device_ids=ids, **no_sync)


# ----------------------------------------------------------------------------- BatchNorm
class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the global batch (all processes).

    ``torch.nn.SyncBatchNorm`` refuses CPU tensors, so this one (used on the CPU, with gloo;
    :func:`sync_batchnorm` picks PyTorch's on CUDA) reduces with the differentiable
    ``torch.distributed.nn.functional.all_reduce``: two passes (sum and count in one call, then
    the variance around the mean) in float64, so N processes with batch B train like one
    process with batch N*B. Outside a multi-process group, or in eval mode, it is a plain
    BatchNorm; its state dict is a BatchNorm's, so checkpoints load into either.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least a 2-D input (N, C, ...), got {x.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        if dist.get_world_size() == 1:
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        self._check_input_dim(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
        xd = x.double()
        local = torch.cat([xd.sum(dims), xd.new_full((1,), float(x.numel() // x.shape[1]))])
        total = all_reduce(local)  # per-channel sums and the sample count, one collective
        count = total[-1]
        mean = total[:-1] / count
        var = all_reduce((xd - mean.view(shape)).pow(2).sum(dims)) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = (
                    1.0 / float(self.num_batches_tracked)
                    if self.momentum is None
                    else self.momentum
                )
                unbiased = var * count / (count - 1).clamp_min(1)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        y = ((xd - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)).to(x.dtype)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def sync_batchnorm(model: nn.Module, device: torch.device | str | None = None) -> nn.Module:
    """Make every BatchNorm layer of ``model`` synchronized over processes (in place: same
    parameters and buffers, so call it before building the optimizer); returns ``model``.

    On CUDA (``device``, default: where the model's parameters are) the layers become
    PyTorch's ``nn.SyncBatchNorm`` (fused kernels, float32, one all-gather of the statistics);
    on the CPU, where that one refuses to run, qatlab's :class:`SyncBatchNorm`."""
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    cuda = torch.device(device).type == "cuda"
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(
            module, (SyncBatchNorm, nn.SyncBatchNorm)
        ):
            if cuda:
                module.__class__ = nn.SyncBatchNorm
                module.process_group = None  # the default (world) group
            else:
                module.__class__ = SyncBatchNorm
    return model
