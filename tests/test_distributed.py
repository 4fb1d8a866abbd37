"""Pruning under DistributedDataParallel: two CPU processes on gloo, each training on its own data
shard. Masks must be identical on both ranks (rank 0's are broadcast) even with a rank-dependent
criterion, and the schedule must step in sync."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from secateur import Random
from secateur.distributed import broadcast_masks, check_in_sync
from secateur.masks import masks_of
from secateur.schedules import GMP, PruningScheduler
from secateur.training import fine_tune, plain_state

STEPS = 12


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {}
        for broadcast in (True, False):
            torch.manual_seed(0)  # same initial weights on every rank (DDP also broadcasts them)
            net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
            # a rank-dependent criterion: without the broadcast the ranks would disagree.
            # The scheduler comes first: it attaches the masks DDP has to see.
            sched = PruningScheduler(net, GMP(final=0.75, start=2, end=10, frequency=2), broadcast=broadcast,
                                     criterion=Random(seed=rank), scope="global")
            # broadcast_buffers=False: otherwise DDP itself would copy rank 0's mask buffers at the next
            # forward, hiding whether secateur's own broadcast works
            ddp = nn.parallel.DistributedDataParallel(net, broadcast_buffers=False)
            g = torch.Generator().manual_seed(100 + rank)  # each rank its own shard
            data = [(torch.randn(8, 16, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(STEPS)]
            opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
            fine_tune(ddp, data, opt, scheduler=sched)
            check_in_sync(sched.step_count)
            results[broadcast] = {"masks": {k: v.clone() for k, v in masks_of(net).items()},
                                  "weights": {k: v.clone() for k, v in plain_state(net).items()},
                                  "sched": sched.state_dict()}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _mismatch_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        from secateur import PruningError, prune
        net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
        prune(net, amount=0.5, targets=["0"] if rank == 0 else None)
        try:
            broadcast_masks(net)
            msg = "no error"
        except PruningError as e:
            msg = str(e)
        try:
            check_in_sync(rank)  # different step counters
            msg2 = "no error"
        except PruningError as e:
            msg2 = str(e)
        with open(os.path.join(out_dir, f"err{rank}.txt"), "w") as f:
            f.write(msg + "\n" + msg2)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned interpreters: ~15-30 s on a shared 2-core machine
def test_ddp_two_ranks_identical_masks_and_synced_schedule(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    a, b = r0[True], r1[True]
    assert a["sched"] == b["sched"] and a["sched"]["step"] == STEPS
    assert a["masks"].keys() == b["masks"].keys() and a["masks"]
    for k in a["masks"]:
        assert torch.equal(a["masks"][k], b["masks"][k]), k
    for k in a["weights"]:  # DDP averaged gradients and the masks agree, so the weights do too
        assert torch.equal(a["weights"][k], b["weights"][k]), k
    total = sum(m.numel() for m in a["masks"].values())
    assert sum(int((~m).sum()) for m in a["masks"].values()) == round(0.75 * total)
    # control: without the broadcast the rank-dependent criterion gives different masks
    assert any(not torch.equal(r0[False]["masks"][k], r1[False]["masks"][k]) for k in r0[False]["masks"])


@pytest.mark.slow
def test_ddp_mismatched_masks_and_steps_are_errors(tmp_path):
    mp.spawn(_mismatch_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for r in (0, 1):
        msg, msg2 = (tmp_path / f"err{r}.txt").read_text().split("\n")
        assert "different tensors" in msg
        assert "steps differ" in msg2
