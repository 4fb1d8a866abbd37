"""The command line, in-process (fast) and through the installed ``secateur`` script (exit codes, no
tracebacks)."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import secateur
from secateur import cli
from secateur import io as sio
from secateur.masks import masks_of

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / ".venv" / "bin" / "secateur"

FACTORY = textwrap.dedent("""
    import torch
    from torch import nn

    def tiny():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(),
                             nn.Linear(8 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 10))

    def grouped():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3, groups=4), nn.ReLU(),
                             nn.Conv2d(16, 8, 1), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))

    def broken():
        raise RuntimeError("factory exploded")

    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.f = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))

        def forward(self, x):
            return x + self.f(x)

    def residual():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), Res(), Res(), Res(), nn.Flatten(),
                             nn.Linear(8 * 8 * 8, 10))

    def zero_head():
        m = tiny()
        torch.nn.init.zeros_(m[-1].weight)
        torch.nn.init.zeros_(m[-1].bias)
        return m

    def evaluate(model):
        torch.manual_seed(1)
        x = torch.randn(8, 3, 8, 8)
        with torch.no_grad():
            return float(-model(x).abs().mean())
""")


@pytest.fixture
def factory(tmp_path, monkeypatch):
    (tmp_path / "cli_models.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("cli_models", None)
    return "cli_models:tiny"


SHAPE = ["--input-shape", "2,3,8,8"]


def run(argv, capsys):
    code = cli.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_prune_report_export_round_trip(tmp_path, factory, capsys):
    out = tmp_path / "tiny.safetensors"
    code, stdout, err = run(["prune", factory, *SHAPE, "--ratio", "0.6", "-o", str(out)], capsys)
    assert code == 0 and out.exists() and "total" in stdout
    desc = sio.describe(out)
    assert desc["source"] == factory
    import cli_models
    loaded = sio.load(cli_models.tiny(), out)
    assert abs(secateur.report(loaded).sparsity - 0.6) < 0.02  # global 60 % of Linear/conv weights
    html, js = tmp_path / "r.html", tmp_path / "r.json"
    code, stdout, _ = run(["report", str(out), *SHAPE, "--html", str(html), "--json", str(js)], capsys)
    assert code == 0 and html.read_text().startswith("<!DOCTYPE html>")
    assert json.loads(js.read_text())["totals"]["zeros"] > 0
    code, stdout, err = run(["export", str(out), *SHAPE, "-o", str(tmp_path / "m.onnx")], capsys)
    assert code == 0 and "onnxruntime vs PyTorch" in stdout and "proves little" not in err


def test_export_says_when_outputs_are_constant(tmp_path, factory, capsys):
    spec = factory.replace(":tiny", ":zero_head")
    code, stdout, err = run(["export", spec, *SHAPE, "-o", str(tmp_path / "z.onnx")], capsys)
    assert code == 0 and "outputs up to 0)" in stdout and "proves little" in err


def test_prune_to_target_macs(tmp_path, factory, capsys):
    out = tmp_path / "t.st"
    code, _, _ = run(["prune", factory, *SHAPE, "--target-macs", "0.4", "-o", str(out)], capsys)
    assert code == 0
    import cli_models
    rep = secateur.report(sio.load(cli_models.tiny(), out), torch.randn(2, 3, 8, 8))
    assert rep.macs_nonzero <= 0.4 * rep.macs
    assert rep.macs_nonzero > 0.35 * rep.macs  # the bisection stops near the target, not far below


def test_prune_structural_to_target_macs(tmp_path, factory, capsys):
    pytest.importorskip("secateur.structured")
    from secateur.metrics import count_macs
    out = tmp_path / "s.st"
    code, _, err = run(["prune", factory, *SHAPE, "--structural", "--target-macs", "0.5", "-o", str(out)], capsys)
    assert code == 0, err
    import cli_models
    x = torch.randn(2, 3, 8, 8)
    dense = count_macs(cli_models.tiny(), x)
    loaded = sio.load(cli_models.tiny(), out)
    assert count_macs(loaded, x) <= 0.5 * dense and not secateur.is_pruned(loaded)


@pytest.mark.parametrize("grouped, groups_after, width_after", [("channels", 4, 2), ("groups", 2, 4)])
def test_prune_structural_options_reach_the_engine(tmp_path, factory, capsys, grouped, groups_after, width_after):
    pytest.importorskip("secateur.structured")
    out = tmp_path / "g.st"
    code, _, err = run(["prune", factory.replace("tiny", "grouped"), *SHAPE, "--structural", "--ratio", "0.5",
                        "--grouped", grouped, "--round-to", "8", "-o", str(out)], capsys)
    assert code == 0, err
    import cli_models
    conv = sio.load(cli_models.grouped(), out)[2]
    assert (conv.groups, conv.in_channels // conv.groups) == (groups_after, width_after)
    assert conv.out_channels == 8  # 16 -> 8: a multiple of --round-to


def test_prune_structural_flags_need_structural(tmp_path, factory, capsys):
    out = tmp_path / "x.st"
    code, _, err = run(["prune", factory, *SHAPE, "--round-to", "8", "--heads", "head_dim", "-o", str(out)], capsys)
    assert code == 1 and "--round-to, --heads" in err and "--structural" in err and not out.exists()


def test_prune_drop_blocks(tmp_path, factory, capsys):
    pytest.importorskip("secateur.structured")
    from secateur.metrics import count_macs
    from secateur.structured import Skipped
    spec, x = factory.replace("tiny", "residual"), torch.randn(2, 3, 8, 8)
    out = tmp_path / "d.st"
    code, _, err = run(["prune", spec, *SHAPE, "--structural", "--drop-blocks", "2", "-o", str(out)], capsys)
    assert code == 0, err
    assert "dropped 2 blocks" in err
    import cli_models
    loaded = sio.load(cli_models.residual(), out)
    assert sum(isinstance(m, Skipped) for m in loaded) == 2 and loaded[0].out_channels == 8  # no channel pruned
    code, _, err = run(["prune", spec, *SHAPE, "--structural", "--drop-blocks", "2", "--target-macs", "0.3",
                        "-o", str(out)], capsys)
    assert code == 0, err
    loaded = sio.load(cli_models.residual(), out)
    dense = count_macs(cli_models.residual(), x)
    assert count_macs(loaded, x) <= 0.3 * dense and loaded[0].out_channels < 8  # the rest from channels
    for argv, msg in [(["--drop-blocks", "2"], "--structural"),
                      (["--structural", "--block-criterion", "cosine"], "add --drop-blocks"),
                      (["--structural", "--drop-blocks", "9"], "only 3 blocks")]:
        bad = tmp_path / "bad.st"
        code, _, err = run(["prune", spec, *SHAPE, *argv, "-o", str(bad)], capsys)
        assert code == 1 and msg in err and not bad.exists(), err


def test_prune_fastest(tmp_path, factory, capsys):
    """--fastest times the depth shares it is given and saves the one it keeps (whatever the clock says: the kept
    share is the fastest row of its own table, and the saved model meets the target)."""
    pytest.importorskip("secateur.structured")
    from secateur.metrics import count_macs
    spec, x = factory.replace("tiny", "residual"), torch.randn(2, 3, 8, 8)
    out = tmp_path / "f.st"
    code, _, err = run(["prune", spec, *SHAPE, "--structural", "--target-macs", "0.4", "--fastest",
                        "--depth-shares", "0", "1", "--block-criterion", "cosine", "-o", str(out)], capsys)
    assert code == 0, err
    assert "kept depth share" in err and "speedup" in err
    import cli_models
    loaded = sio.load(cli_models.residual(), out)
    assert count_macs(loaded, x) <= 0.4 * count_macs(cli_models.residual(), x)
    for argv, msg in [(["--fastest", "--target-macs", "0.4"], "--structural"),
                      (["--structural", "--fastest"], "give --target-macs"),
                      (["--structural", "--fastest", "--target-macs", "0.4", "--drop-blocks", "1"], "no --drop-blocks"),
                      (["--structural", "--target-macs", "0.4", "--depth-shares", "0"], "add --fastest"),
                      (["--structural", "--target-macs", "0.4", "--compile"], "add --fastest"),
                      (["--compile", "--ratio", "0.4"], "--structural"),
                      (["--structural", "--fastest", "--target-macs", "0.4", "--depth-shares", "2"], "depth")]:
        bad = tmp_path / "bad.st"
        code, _, err = run(["prune", spec, *SHAPE, *argv, "-o", str(bad)], capsys)
        assert code == 1 and msg in err and not bad.exists(), err


@pytest.mark.slow
def test_prune_fastest_compiled(tmp_path, factory, capsys):
    """--fastest --compile: the candidates are timed under torch.compile, the saved model is a plain one."""
    pytest.importorskip("torch._inductor")
    from torch._dynamo.utils import counters
    spec = factory.replace("tiny", "residual")
    out = tmp_path / "c.st"
    counters.clear()
    code, _, err = run(["prune", spec, *SHAPE, "--structural", "--target-macs", "0.5", "--fastest",
                        "--depth-shares", "0", "1", "--compile", "-o", str(out)], capsys)
    if code == 3 and "compile" in err.lower():  # pragma: no cover - no C++ toolchain here
        pytest.skip(err)
    assert code == 0, err
    assert "(compiling each first)" in err and counters["stats"]["unique_graphs"] >= 2
    import cli_models
    sio.load(cli_models.residual(), out)


def test_prune_nm_pattern(tmp_path, factory, capsys):
    out = tmp_path / "nm.st"
    code, _, err = run(["prune", factory, *SHAPE, "--pattern", "2:4", "-o", str(out)], capsys)
    assert code == 1 and "divisible" in err  # the first conv has 3 input channels: a clear error
    code, _, err = run(["prune", factory, *SHAPE, "--pattern", "block1x4", "--ratio", "0.5", "-o", str(out)],
                       capsys)
    assert code == 1 and "block" in err


def test_sensitivity_allocate_and_apply(tmp_path, factory, capsys):
    js, png, out = tmp_path / "s.json", tmp_path / "s.png", tmp_path / "alloc.st"
    code, stdout, _ = run(["sensitivity", factory, *SHAPE, "--ratios", "0.3,0.6,0.9", "--json", str(js),
                           "--plot", str(png), "--target", "params", "--fraction", "0.5", "-o", str(out)], capsys)
    assert code == 0, stdout
    d = json.loads(js.read_text())
    assert set(d["curves"]) == {"0", "2", "5", "7"}
    assert png.read_bytes()[:4] == b"\x89PNG"
    import cli_models
    loaded = sio.load(cli_models.tiny(), out)
    pruned = sum(int((~m).sum()) for m in masks_of(loaded).values())
    total = sum(m.weight.numel() for m in loaded.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)))
    assert pruned >= 0.5 * total
    code, stdout, _ = run(["sensitivity", factory, *SHAPE, "--ratios", "0.5", "--eval", "cli_models:evaluate"],
                          capsys)
    assert code == 0 and "baseline" in stdout


def test_bench_before_after(tmp_path, factory, capsys):
    out = tmp_path / "b.st"
    assert run(["prune", factory, *SHAPE, "--ratio", "0.5", "-o", str(out)], capsys)[0] == 0
    js = tmp_path / "bench.json"
    code, stdout, _ = run(["bench", str(out), *SHAPE, "--repeats", "3", "--warmup", "1", "--json", str(js)], capsys)
    assert code == 0 and "before" in stdout and "after" in stdout
    d = json.loads(js.read_text())
    assert d["before"]["params"] == d["after"]["params"]
    assert d["after"]["nonzero_params"] < d["before"]["nonzero_params"]
    assert d["after"]["latency_ms_median"] > 0
    lines = stdout.splitlines()
    rows = [ln for ln in lines if ln.startswith(("before", "after"))]
    for ln in rows:  # every cell stands apart: numbers never run into each other
        cells = ln.split()
        assert len(cells) == 7, ln
    speed = [ln for ln in lines if ln.startswith("speedup")]
    ratio = d["before"]["latency_ms_median"] / d["after"]["latency_ms_median"]
    assert speed and f"{ratio:.2f}x" in speed[0]


def test_exit_codes_in_process(tmp_path, factory, capsys, monkeypatch):
    code, _, err = run(["prune", "no_such_model_xyz", "-o", str(tmp_path / "x")], capsys)
    assert code == 1 and "unknown model" in err and "Traceback" not in err
    # the user's factory raising is bad input, named (exit 1); --debug shows the traceback
    code, _, err = run(["prune", "cli_models:broken", "-o", str(tmp_path / "x")], capsys)
    assert code == 1 and "factory raised" in err and "factory exploded" in err and "Traceback" not in err
    with pytest.raises(secateur.PruningError) as e:
        cli.main(["--debug", "prune", "cli_models:broken", "-o", str(tmp_path / "x")])
    assert isinstance(e.value.__cause__, RuntimeError)
    # an internal error: exit 3 with a hint at --debug, which re-raises it
    with monkeypatch.context() as mp:
        mp.setattr(cli, "load_model", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("internal boom")))
        code, _, err = run(["prune", factory, "-o", str(tmp_path / "x")], capsys)
        assert code == 3 and "internal boom" in err and "--debug" in err
        with pytest.raises(RuntimeError):
            cli.main(["prune", factory, "-o", str(tmp_path / "x"), "--debug"])
    with pytest.raises(SystemExit) as e:
        cli.main(["prune", factory])  # -o missing
    assert e.value.code == 2
    code, _, err = run(["report", str(tmp_path / "missing.st")], capsys)  # not a file: treated as a spec
    assert code == 1
    bad = tmp_path / "bad.st"
    bad.write_bytes(b"garbage that is not safetensors")
    code, _, err = run(["report", str(bad)], capsys)
    assert code == 1 and "truncated or corrupted" in err


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_help_everywhere(name, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([name, "--help"])
    assert e.value.code == 0
    assert "usage: secateur " + name in capsys.readouterr().out


def test_demo_keeps_its_options(capsys):
    with pytest.raises(SystemExit):
        cli.main(["demo", "--help"])
    text = capsys.readouterr().out
    for opt in ("--epochs", "--ratio", "--global-ratio", "--data", "--out", "--seed"):
        assert opt in text


def _script(tmp_path):
    if not SCRIPT.exists():
        pytest.skip("the console script is installed by scripts/setup.sh")
    (tmp_path / "cli_models.py").write_text(FACTORY)
    env = dict(os.environ, PYTHONPATH=str(tmp_path), OMP_NUM_THREADS="1")

    def sh(*argv):
        return subprocess.run([str(SCRIPT), *argv], capture_output=True, text=True, env=env, cwd=tmp_path,
                              timeout=300)
    return sh


def test_console_script_exit_codes(tmp_path):
    sh = _script(tmp_path)
    r = sh("--help")
    assert r.returncode == 0 and all(c in r.stdout for c in cli.COMMANDS)
    r = sh("prune", "cli_models:tiny", *SHAPE, "--ratio", "1.5", "-o", "t2.st")
    assert r.returncode == 1 and "secateur: error" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "t2.st").exists()
    r = sh("prune", "--no-such-option")
    assert r.returncode == 2 and "usage:" in r.stderr


@pytest.mark.slow
def test_console_script_prune_then_export(tmp_path):
    sh = _script(tmp_path)
    r = sh("prune", "cli_models:tiny", *SHAPE, "--ratio", "0.5", "-o", "t.st")
    assert r.returncode == 0 and (tmp_path / "t.st").exists(), r.stderr
    r = sh("export", "t.st", *SHAPE, "-o", "t.onnx")
    assert r.returncode == 0 and "onnxruntime vs PyTorch" in r.stdout, r.stderr


def test_bench_refuses_cuda_without_a_gpu_and_unknown_devices(capsys):
    import torch
    from secateur.cli import main
    if not torch.cuda.is_available():
        assert main(["bench", "torch.nn:Identity", "--input-shape", "1,4", "--device", "cuda"]) == 1
        assert "CUDA is not available" in capsys.readouterr().err
    assert main(["bench", "torch.nn:Identity", "--input-shape", "1,4", "--device", "tpu-ish"]) == 1
    assert "unknown device" in capsys.readouterr().err


def test_structural_prune_that_removes_nothing_says_so(tmp_path, factory, capsys):
    """A model with no prunable group (one Linear: its inputs and outputs stay) is saved unchanged, with a warning
    rather than a quiet 'pruned 0 channels' line."""
    out = tmp_path / "lin.safetensors"
    code, _, err = run(["prune", "torch.nn:Identity", "--input-shape", "1,4", "--structural", "-o", str(out)], capsys)
    assert code == 0 and "warning: no channel was removed" in err
    code, _, err = run(["prune", factory, *SHAPE, "--structural", "--ratio", "0.5", "-o", str(out)], capsys)
    assert code == 0 and "warning" not in err
