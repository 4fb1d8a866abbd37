"""benchmarks/bench_target_precision.py end to end on one small model (no peer): the JSON holds one row per target,
secateur's figure is the shipped prune_channels (at or under the target, within 2 % of it on regnet_x_400mf at
0.5, where one ratio alone keeps about half the target), and the top-up is switched back on afterwards."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_target_precision.py"


def test_runs_and_reports_each_way(tmp_path):
    pytest.importorskip("torchvision")
    import secateur.structured.targets as targets
    shipped = targets._top_up
    spec = importlib.util.spec_from_file_location("bench_target_precision", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "r.json"
    mod.main(["--models", "regnet_x_400mf", "--targets", "0.5", "--no-peer", "--out", str(out)])
    assert targets._top_up is shipped
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 1 and rows[0]["tp"] is None
    assert 0.98 * 0.5 <= rows[0]["secateur"] <= 0.5 and rows[0]["one_ratio"] < 0.3
