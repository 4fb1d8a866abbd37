"""Checkpoint / resume with a real kill: a training subprocess that checkpoints every step is SIGKILLed
mid-run, resumed from its last checkpoint, and must end with exactly the masks, scheduler state and
weights of an uninterrupted run with the same seeds."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from secateur.training import load_checkpoint

TOTAL_STEPS = 40

SCRIPT = textwrap.dedent('''
    import sys, time
    import torch
    from torch import nn
    import torch.nn.functional as F
    from secateur.masks import reapply
    from secateur.schedules import GMP, PruningScheduler
    from secateur.training import load_checkpoint, resume, save_checkpoint

    ckpt, out, total, delay, do_resume = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5] == "1"
    torch.set_num_threads(1)
    torch.manual_seed(0)
    g0 = torch.Generator().manual_seed(0)
    x_all = torch.randn(1280, 64, generator=g0)
    y_all = (x_all @ torch.randn(64, 10, generator=g0)).argmax(1)
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    sched = PruningScheduler(model, GMP(final=0.85, start=4, end=32, frequency=4), scope="global")
    history = []
    if do_resume:
        history = resume(model, load_checkpoint(ckpt), scheduler=sched, optimizer=opt)
    n = len(y_all)
    while sched.step_count < total:
        t = sched.step_count                      # the data of a step depends only on the step
        g = torch.Generator().manual_seed(1000 + t // 20)
        idx = torch.randperm(n, generator=g)[(t % 20) * 64:(t % 20) * 64 + 64]
        loss = F.cross_entropy(model(x_all[idx]), y_all[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        reapply(model)
        history.append({"step": t, "loss": float(loss.detach())})
        save_checkpoint(ckpt, model, scheduler=sched, optimizer=opt, history=history)
        time.sleep(delay)
    save_checkpoint(out, model, scheduler=sched, optimizer=opt, history=history)
''')


def _run(tmp_path, name, *, resume=False, delay=0.0, wait=True):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([p for p in sys.path if p]))
    args = [sys.executable, str(script), str(tmp_path / f"{name}.ckpt"), str(tmp_path / f"{name}.final"),
            str(TOTAL_STEPS), str(delay), "1" if resume else "0"]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if wait:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()[-2000:]
    return proc


def _run_here(tmp_path, name):
    """The uninterrupted reference run, in this process (saves one interpreter start)."""
    argv, threads = sys.argv, torch.get_num_threads()
    sys.argv = ["train.py", str(tmp_path / f"{name}.ckpt"), str(tmp_path / f"{name}.final"), str(TOTAL_STEPS),
                "0", "0"]
    try:
        exec(compile(SCRIPT, "train.py", "exec"), {"__name__": "__main__"})
    finally:
        sys.argv = argv
        torch.set_num_threads(threads)


@pytest.mark.slow  # two interpreter starts and a paced run: ~15-30 s on a shared 2-core machine
def test_killed_run_resumes_to_the_same_masks_and_schedule(tmp_path):
    _run_here(tmp_path, "ref")
    proc = _run(tmp_path, "run", delay=0.08, wait=False)
    ckpt = tmp_path / "run.ckpt"
    deadline = time.monotonic() + 90
    killed_at = None
    try:
        while time.monotonic() < deadline:
            if ckpt.exists():
                step = load_checkpoint(ckpt)["scheduler"]["step"]
                if step >= 10:  # past the first GMP updates, well before the end
                    proc.send_signal(signal.SIGKILL)
                    killed_at = step
                    break
            if proc.poll() is not None:
                break
            time.sleep(0.05)
    finally:
        if proc.poll() is None and killed_at is None:
            proc.kill()
        proc.communicate(timeout=30)
    assert killed_at is not None, "the run ended before it could be killed"
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "run.final").exists()
    at_kill = load_checkpoint(ckpt)
    assert at_kill["scheduler"]["step"] < TOTAL_STEPS

    _run(tmp_path, "run", resume=True)
    a, b = load_checkpoint(tmp_path / "ref.final"), load_checkpoint(tmp_path / "run.final")
    assert a["scheduler"] == b["scheduler"] and a["scheduler"]["step"] == TOTAL_STEPS
    assert [s for s, _ in a["scheduler"]["applied"]] == [8, 12, 16, 20, 24, 28, 32]
    assert a["masks"].keys() == b["masks"].keys()
    for k in a["masks"]:
        assert torch.equal(a["masks"][k], b["masks"][k]), k
    for k in a["weights"]:
        assert torch.equal(a["weights"][k], b["weights"][k]), k
    assert [h["step"] for h in b["history"]] == list(range(TOTAL_STEPS))
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]
    sparsity = sum(int((~m).sum()) for m in b["masks"].values()) / sum(m.numel() for m in b["masks"].values())
    assert sparsity == pytest.approx(0.85, abs=1e-3)
