"""Pruning under ``torch.distributed`` (DDP, torchrun): every rank must hold the same masks.

Masks are decided on every rank, then rank 0's are broadcast, so a random, data-dependent or
float-order-sensitive criterion can never leave ranks disagreeing. Schedules are pure functions of the
step counter, so ranks that step together stay in sync; `check_in_sync` verifies it."""
from __future__ import annotations

import zlib

import torch
import torch.distributed as dist
from torch import nn

from secateur.errors import fail
from secateur.masks import iter_masks, set_mask


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _comm_device() -> torch.device:
    """NCCL only moves CUDA tensors; gloo moves CPU tensors."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def broadcast_masks(model: nn.Module, src: int = 0) -> None:
    """Make every rank's masks equal to rank ``src``'s. All ranks must hold masks on the same tensors
    (checked first: a mismatch is a PruningError on every rank, nothing changed)."""
    if not is_distributed():
        return
    entries = sorted(iter_masks(model), key=lambda e: (e[0], e[2]))
    names = [f"{n}.{p}" for n, _, p, _ in entries]
    layout = ";".join(f"{k}{tuple(m.shape)}" for k, (*_, m) in zip(names, entries))
    sizes = torch.tensor([len(names), sum(m.numel() for *_, m in entries), zlib.crc32(layout.encode())],
                         dtype=torch.int64)
    dev = _comm_device()
    ref = sizes.to(dev, copy=True)  # broadcast writes in place: keep our own counts apart
    dist.broadcast(ref, src)
    mismatch = torch.tensor([int(not torch.equal(ref.cpu(), sizes))], dtype=torch.int64, device=dev)
    dist.all_reduce(mismatch)
    if int(mismatch) != 0:
        raise fail("ranks hold masks on different tensors", where=f"rank {dist.get_rank()}",
                   value={"masks": len(names), "mask elements": int(sizes[1])})
    if not entries:
        return
    flat = torch.cat([m.reshape(-1).to(dev, torch.uint8) for *_, m in entries])
    dist.broadcast(flat, src)
    offset = 0
    for _, module, param, mask in entries:
        n = mask.numel()
        set_mask(module, param, flat[offset:offset + n].reshape(mask.shape).to(mask.device, torch.bool))
        offset += n


def check_in_sync(step: int) -> None:
    """Raise a PruningError if the ranks' scheduler step counters differ."""
    if not is_distributed():
        return
    t = torch.tensor([step, -step], dtype=torch.int64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    if int(t[0]) != step or -int(t[1]) != step:
        raise fail("scheduler steps differ across ranks", where=f"rank {dist.get_rank()}",
                   value={"this rank": step, "max": int(t[0]), "min": -int(t[1])})
