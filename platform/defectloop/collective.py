"""How fitting code talks to its peers when one fit is split across workers.

A fit runs on a shard of the images in each of ``world`` processes; the few places where the
shards must agree (bank sizes, the final coreset, the abnormal bank, statistics, validation
losses, thresholds) go through these operations. :class:`Collective` is the single-process case
(every operation is the identity), :class:`TorchCollective` uses torch.distributed (gloo on CPU,
nccl on GPU) as Ray Train's TorchTrainer sets it up. No Ray here: the models stay pure torch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn


class Collective:
    """One process: nothing to agree on."""

    rank = 0
    world = 1

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (picklable objects, CPU tensors included)."""
        return [obj]

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """``obj`` of rank ``src`` on every rank."""
        return obj

    def all_sum(self, value: float) -> float:
        return float(value)

    def wrap(self, module: nn.Module) -> nn.Module:
        """The module to train: gradients averaged across ranks (DistributedDataParallel) when world > 1."""
        return module


class TorchCollective(Collective):
    """torch.distributed, already initialised (by Ray Train, or ``init_process_group``)."""

    def __init__(self):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised")
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()

    def all_gather(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src)
        return box[0]

    def all_sum(self, value: float) -> float:
        t = torch.tensor(float(value), dtype=torch.float64)
        dist.all_reduce(t)
        return float(t)

    def wrap(self, module: nn.Module) -> nn.Module:
        if self.world == 1:
            return module
        return nn.parallel.DistributedDataParallel(module)


LOCAL = Collective()
