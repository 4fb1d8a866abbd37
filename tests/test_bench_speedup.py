"""benchmarks/bench_speedup.py: argument resolution per device, and the device code path (table measured on
the chosen device, in its dtype and memory format) run end to end on the CPU with tiny settings."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_speedup.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_speedup", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop(spec.name, None)


def test_cpu_defaults_unchanged(bench, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    a = bench.parse([])
    assert a.batch == [1, 8] and a.table_batch == [1, 8] and a.compile_batch == [8]
    assert a.place == bench.Place("cpu", torch.float32, False)
    assert [(p.device, b, c) for p, b, c in bench.timings(a)] == [("cpu", 1, False), ("cpu", 8, False)]


def test_cuda_defaults(bench, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    a = bench.parse(["--device", "cuda", "--gpu-batch", "64", "256", "--compile"])
    assert a.batch == [] and a.table_batch == [64] and a.compile_batch == [256]
    assert a.place == bench.Place("cuda", torch.bfloat16, True)
    # no CPU timing; eager at both batches, compiled at the largest only
    assert [(p.device, b, c) for p, b, c in bench.timings(a)] == [
        ("cuda", 64, False), ("cuda", 256, False), ("cuda", 256, True)]
    # the lead's command line: `--batch` with no sizes before another option; auto picks cuda when present
    a = bench.parse(["--batch", "--models", "resnet50", "--gpu-batch", "64", "256"])
    assert a.place.device == "cuda" and a.batch == [] and a.models == ["resnet50"]
    a = bench.parse(["--device", "cuda", "--batch", "1", "--table-batch", "8", "--no-channels-last"])
    assert a.table_batch == [8] and not a.place.channels_last
    assert [(p.device, p.dtype, b) for p, b, _ in bench.timings(a)][0] == ("cpu", torch.float32, 1)


@pytest.mark.parametrize("argv", [
    ["--device", "cpu", "--batch"],                      # nothing would be timed
    ["--device", "cpu", "--table-batch", "-1"],
    ["--device", "cpu", "--table-batch", "1", "0"],
    ["--batch", "0"],
    ["--table-batch", "0"],
    ["--size", "8"],
])
def test_bad_arguments_refused(bench, argv, capsys):
    with pytest.raises(SystemExit) as e:
        bench.parse(argv)
    assert e.value.code == 2


def test_cuda_refused_without_gpu(bench, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        bench.parse(["--device", "cuda"])
    assert "cuda.is_available" in capsys.readouterr().err


@pytest.mark.slow
def test_device_path_end_to_end_on_cpu(bench, tmp_path):
    """The GPU path's semantics on the CPU: the table is measured on a copy in the device's dtype and
    memory format at --table-batch, the models are timed there, and the JSON says so."""
    out = tmp_path / "speedup.json"
    torch.manual_seed(0)
    rows = bench.main(["--models", "resnet18", "--targets", "2", "--batch", "2", "--size", "32",
                       "--methods", "secateur", "secateur-latency", "--repeats", "2", "--warmup", "1",
                       "--table-points", "3", "--table-repeats", "1", "--table-batch", "1", "2",
                       "--channels-last", "--out", str(out)])
    assert {r["method"] for r in rows} == {"secateur", "secateur-latency"}
    for r in rows:
        assert r["device"] == "cpu" and r["channels_last"] and r["dtype"] == "float32" and r["batch"] == 2
        assert 1.9 <= r["macs_reduction"] <= 2.3            # both meet the 2x MACs target at the benchmark input
        assert r["speedup"] > 0
    # one latency-aware plan per table batch, each from its own table; the other methods have none
    assert sorted((r["method"], r["table_batch"] or 0) for r in rows) == [
        ("secateur", 0), ("secateur-latency", 1), ("secateur-latency", 2)]
    lat = next(r for r in rows if r["table_batch"] == 2)
    # the table's own estimate, from timings of this (possibly busy) machine: a number, not a claim about its size
    # (it read 0.99 for a 2x MACs plan once while another job used both CPUs)
    assert 0 < lat["predicted_speedup"] < float("inf") and lat["table_device"].startswith("cpu-")
    # the kept plan is the one its table rates fastest among those that meet the target (uniform included)
    assert lat["plan_options"][0].startswith("latency table: kept the") and "uniform" in lat["plan_options"][0]
    saved = json.loads(out.read_text())
    assert saved["args"]["place"] == {"device": "cpu", "dtype": "float32", "channels_last": True}
    assert len(saved["rows"]) == len(rows)


def test_machine_load_is_a_share_of_the_cpus(bench):
    load = bench.machine_load(0.2)
    assert load["busy"] is None or 0.0 <= load["busy"] <= 1.0
    assert len(load["load_average"]) == 3 and load["cpus"] >= 1


def test_quiet_check_reports_and_waits(bench, monkeypatch, capsys):
    a = bench.parse(["--device", "cpu", "--quiet-check", "--max-busy", "0.2", "--wait-quiet", "100"])
    seen = iter([0.9, 0.5, 0.1, 0.9])
    monkeypatch.setattr(bench, "machine_load", lambda: {"busy": next(seen), "load_average": (1.0, 1.0, 1.0),
                                                        "cpus": 2})
    monkeypatch.setattr(bench.time, "sleep", lambda s: None)
    load = bench.quiet_check(a, "test")
    assert load["quiet"] and load["busy"] == 0.1          # waited through two busy readings
    assert capsys.readouterr().err.count("waiting for a quiet machine") == 2
    a.wait_quiet = 0
    load = bench.quiet_check(a, "test")
    assert not load["quiet"] and "NOT QUIET" in capsys.readouterr().err
    assert bench.quiet_check(bench.parse(["--device", "cpu"]), "off") is None


@pytest.mark.parametrize("first_budget", [30.0, -5.0, 80.0])
def test_latency_budget_calibrated_on_the_measured_macs(bench, first_budget):
    """The table's MACs budget can be off (a bare attention parameter it does not count): the allocation is
    re-run until the pruned model's own MACs reduction meets the target, never short of it."""
    from secateur.errors import PruningError

    def allocate(b):  # true MACs = 20 fixed + 2 * table budget; budgets under 5 cannot be met
        if b < 5:
            raise PruningError("below the floors")
        model = torch.nn.Identity()
        model._macs_reduction = 220.0 / (20 + 2 * b)
        return model
    for target in (2.0, 4.0):
        got = bench._calibrated(allocate, first_budget, full=100.0, target=target)._macs_reduction
        assert target <= got <= target * 1.02
    with pytest.raises(PruningError):
        bench._calibrated(allocate, first_budget, full=100.0, target=50.0)  # needs a budget below the floors


def test_depth_method_meets_the_target_depth_first(bench):
    """secateur-depth drops the blocks that fit above the target first, then width takes the rest: the target is
    met closely, not passed by a whole block."""
    import torchvision
    from secateur.structured import Skipped
    torch.manual_seed(0)
    dense = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 64, 64)
    args = bench.parse(["--methods", "secateur-depth"])
    base = bench.macs_of(dense, x)
    out = bench.METHODS["secateur-depth"](dense, x, [1.2, 3.0], args)
    for t, model in out.items():
        assert t <= base / bench.macs_of(model, x) <= 1.15 * t
    assert sum(isinstance(m, Skipped) for m in out[1.2].modules()) == 1  # a second block would cross 1.2x
    assert sum(isinstance(m, Skipped) for m in out[3.0].modules()) == 5 and out[3.0].fc.in_features < 512
    assert not any(isinstance(m, Skipped) for m in dense.modules())  # the dense model is left alone


@pytest.mark.parametrize("meth", ["secateur-auto", pytest.param("secateur-auto-compiled", marks=pytest.mark.slow)])
def test_auto_method_keeps_the_fastest_of_its_depth_shares(bench, meth):
    """secateur-auto runs prune_fastest (-compiled: with the candidates timed under torch.compile): one candidate
    per --auto-shares, the kept one named first, the target met, the dense model left alone."""
    import torchvision
    from secateur.structured import Skipped
    torch.manual_seed(0)
    dense = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 64, 64)
    args = bench.parse(["--methods", meth, "--auto-shares", "0", "1", "--repeats", "3",
                        "--table-points", "3", "--table-repeats", "1"])
    args.table_batch = 1
    base = bench.macs_of(dense, x)
    out = bench.METHODS[meth](dense, x, [2.0], args)
    model = out[2.0]
    assert 2.0 <= base / bench.macs_of(model, x) <= 2.3
    kept, *options = model.plan_options
    assert kept.startswith("kept depth share") and len(options) == 2
    dropped = sum(isinstance(m, Skipped) for m in model.modules())
    assert kept.startswith(f"kept depth share {1 if dropped else 0}:")
    assert not any(isinstance(m, Skipped) for m in dense.modules())


def test_plot_keeps_the_rows_planned_at_the_timed_batch(tmp_path):
    """plot_speedup.py: one bar per method and cell, the latency methods' rows planned at another batch left out."""
    spec = importlib.util.spec_from_file_location("plot_speedup", SCRIPT.with_name("plot_speedup.py"))
    plot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot)
    rows = [dict(model="resnet50", batch=b, target=t, method=m, table_batch=tb, efficiency=e, compiled=False)
            for b, t, m, tb, e in [(8, 2.0, "tp", None, 0.9), (1, 2.0, "tp", None, 0.8),
                                   (1, 2.0, "secateur-auto", 1, 0.95), (1, 2.0, "secateur-auto", 8, 0.5),
                                   (8, 2.0, "secateur-auto", 8, 1.1), (8, 2.0, "secateur-auto", 1, 0.7)]]
    order, methods, eff = plot.cells(rows)
    assert order == [("resnet50", 1, 2.0), ("resnet50", 8, 2.0)] and methods == ["tp", "secateur-auto"]
    assert eff[("resnet50", 1, 2.0), "secateur-auto"] == 0.95 and eff[("resnet50", 8, 2.0), "secateur-auto"] == 1.1
    pytest.importorskip("matplotlib")
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"rows": rows, "machine": {"cpu": "x", "cpu_count": 2}}))
    plot.main([str(path)])
    assert path.with_suffix(".png").stat().st_size > 1000
    with pytest.raises(SystemExit, match="no compiled rows"):
        plot.main([str(path), "--compiled"])


def test_plot_compiled_takes_the_compiled_rows_only(tmp_path):
    spec = importlib.util.spec_from_file_location("plot_speedup", SCRIPT.with_name("plot_speedup.py"))
    plot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot)
    rows = [dict(model="mobilenet_v2", batch=1, target=4.0, method=m, table_batch=1, efficiency=e, compiled=c)
            for m, e, c in [("secateur-auto", 0.7, False), ("secateur-auto", 0.9, True),
                            ("secateur-auto-compiled", 0.95, True)]]
    order, methods, eff = plot.cells(rows, compiled=True)
    assert methods == ["secateur-auto", "secateur-auto-compiled"]
    assert eff[("mobilenet_v2", 1, 4.0), "secateur-auto"] == 0.9
    assert plot.cells(rows)[1] == ["secateur-auto"]
    pytest.importorskip("matplotlib")
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"rows": rows, "machine": {"cpu": "x", "cpu_count": 2}}))
    plot.main([str(path), "--compiled"])
    assert (tmp_path / "s_compiled.png").stat().st_size > 1000


def test_plot_merges_runs_one_model_each(tmp_path):
    spec = importlib.util.spec_from_file_location("plot_speedup", SCRIPT.with_name("plot_speedup.py"))
    plot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot)
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    for path, model, day in ((a, "resnet50", "d1"), (b, "vit_b_16", "d2")):
        rows = [dict(model=model, batch=1, target=2.0, method="tp", table_batch=None, efficiency=0.9, compiled=True)]
        path.write_text(json.dumps({"rows": rows, "machine": {"cpu": "x", "cpu_count": 2, "date_utc": day}}))
    rows, machine, dates = plot.merged([a, b])
    assert [r["model"] for r in rows] == ["resnet50", "vit_b_16"] and dates == "d1, d2"
    with pytest.raises(SystemExit, match="resnet50 is in both"):
        plot.merged([a, b, a])
    pytest.importorskip("matplotlib")
    plot.main([str(a), str(b), "--compiled", "--out", str(tmp_path / "all.png")])
    assert (tmp_path / "all.png").stat().st_size > 1000
