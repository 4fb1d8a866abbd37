"""Report: effective zeros, MACs against closed-form counts, table/JSON/PNG/HTML, real browser render."""
import copy
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from torch import nn

import secateur
from secateur.errors import PruningError
from secateur.report import Report, report


def small_cnn():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, groups=4), nn.ReLU(),
        nn.ConvTranspose2d(8, 4, 2, stride=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 12 * 12, 16), nn.ReLU(), nn.Linear(16, 10))


X = (2, 3, 8, 8)


def closed_form_macs(x_shape):
    """MACs of small_cnn written out by hand from the layer formulas (not from hooks)."""
    n, _, h, w = x_shape
    conv1 = n * h * w * 8 * 3 * 3 * 3                 # padding 1 keeps 8x8
    h2, w2 = h - 2, w - 2
    conv2 = n * h2 * w2 * 8 * (8 // 4) * 3 * 3        # grouped conv
    convt = n * h2 * w2 * 8 * 4 * 2 * 2               # every input pixel meets every kernel entry
    lin1 = n * (4 * 12 * 12) * 16
    lin2 = n * 16 * 10
    return {"0": conv1, "3": conv2, "5": convt, "8": lin1, "10": lin2}


def test_dense_report_params_and_macs_match_formulas():
    m = small_cnn()
    r = report(m, torch.randn(X))
    assert r.total_params == sum(p.numel() for p in m.parameters())
    rows = {row.name: row for row in r.rows}
    for name, macs in closed_form_macs(X).items():
        assert rows[name].macs == macs, name
        assert rows[name].macs_nonzero == macs  # random init has no exact zeros
    assert r.macs == sum(closed_form_macs(X).values())
    if r.model_macs is not None:  # torch's flop counter (secateur.metrics) agrees on this conv/linear model
        assert r.model_macs == r.macs


def test_zeros_count_effective_masked_weights():
    m = small_cnn()
    secateur.prune(m, 0.7)
    secateur.prune(m, 0.3, targets=["1"], include_bias=True, pattern="element")  # BatchNorm weight and bias
    r = report(m, torch.randn(X))
    twin = secateur.finalize(copy.deepcopy(m))
    expected_zeros = sum(int((p == 0).sum()) for p in twin.parameters())
    assert r.total_zeros == expected_zeros
    assert r.total_params == sum(p.numel() for p in twin.parameters())
    rows = {row.name: row for row in r.rows}
    tw = dict(twin.named_modules())
    for name in ("0", "3", "5", "8", "10"):
        nz = int(torch.count_nonzero(tw[name].weight))
        assert rows[name].macs_nonzero * tw[name].weight.numel() == rows[name].macs * nz
        assert rows[name].masked and rows[name].type == type(tw[name]).__name__
    assert abs(r.sparsity - expected_zeros / r.total_params) < 1e-12


def test_report_leaves_model_untouched():
    m = small_cnn().train()
    before = copy.deepcopy(m.state_dict())
    report(m, torch.randn(X))
    assert m.training and all(mod.training for mod in m.modules())
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN running stats not updated


def test_table_is_aligned_and_complete():
    m = small_cnn()
    secateur.prune(m, 0.5)
    r = report(m, torch.randn(X))
    lines = str(r).splitlines()
    end = next(i for i, ln in enumerate(lines) if ln.startswith("non-zero"))
    body, lines = lines[:end], lines[:end + 1]
    assert len({len(ln) for ln in body}) == 1  # right-aligned last column: every line ends at the same column
    names = [ln.split()[0] for ln in lines[2:2 + len(r.rows)]]
    assert names == [row.name for row in r.rows]
    assert lines[-2].startswith("total") and f"{r.total_params:,}" in lines[-2]


def test_json_round_trip(tmp_path):
    m = small_cnn()
    secateur.prune(m, 0.4)
    r = report(m, torch.randn(X))
    r.to_json(tmp_path / "r.json")
    d = json.loads((tmp_path / "r.json").read_text())
    assert d["totals"]["zeros"] == r.total_zeros and d["totals"]["macs"] == r.macs
    back = Report.from_dict(d)
    assert back.to_dict() == r.to_dict()
    with pytest.raises(PruningError):
        Report.from_dict({"model": "x"})


def test_histograms_png(tmp_path):
    m = small_cnn()
    before = report(m)
    secateur.prune(m, 0.6)
    r = report(m)
    r.histograms(tmp_path / "h.png", before=before)
    assert (tmp_path / "h.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # histograms count the non-zero weights only
    w = secateur.finalize(copy.deepcopy(m))[8].weight
    assert sum(r.hists["8"]["counts"]) == int(torch.count_nonzero(w))


def test_missing_matplotlib_names_the_extra(tmp_path, monkeypatch):
    r = report(small_cnn())
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(PruningError, match=re.escape("pip install secateur[plot]")):
        r.histograms(tmp_path / "h.png")
    r.to_html(tmp_path / "page.html")  # the page still renders, with a note instead of images
    assert "pip install secateur[plot]" in (tmp_path / "page.html").read_text()


def _page(tmp_path):
    from secateur.sensitivity import sensitivity
    torch.manual_seed(0)
    m = small_cnn()
    x = torch.randn(X)
    before = report(m, x)
    ref = m(x).detach()
    sens = sensitivity(m, lambda mod: -float((mod(x) - ref).pow(2).mean().detach()), ratios=(0.3, 0.6, 0.9),
                       progress=False)
    secateur.prune(m, 0.6)
    r = report(m, x)
    history = [{"step": "dense", "accuracy": 0.91, "sparsity": 0.0},
               {"step": "pruned 60%", "accuracy": 0.84, "sparsity": 0.6},
               {"step": "fine-tuned", "accuracy": 0.9, "sparsity": 0.6}]
    path = tmp_path / "report.html"
    r.to_html(path, history=history, sensitivity=sens, before=before)
    return path, r


def test_html_is_self_contained(tmp_path):
    path, r = _page(tmp_path)
    text = path.read_text()
    assert text.startswith("<!DOCTYPE html>")
    srcs = re.findall(r'src="([^"]*)"', text)
    assert len(srcs) == 3 and all(s.startswith("data:image/png;base64,") for s in srcs)  # hist, sens, history
    assert "<link" not in text and "<script" not in text and "http" not in text
    for row in r.rows:
        assert f"<td class=\"l\">{row.name}</td>" in text
    assert "Sensitivity" in text and "Pruning history" in text and "fine-tuned" in text


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed (scripts/setup.sh installs it "
                    "with apt-get where available)")
def test_html_renders_in_headless_chromium(tmp_path):
    path, _ = _page(tmp_path)
    shot = tmp_path / "shot.png"
    cmd = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1280,2000",
           path.as_uri()]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    assert shot.exists()
    from PIL import Image
    img = Image.open(shot).convert("RGB")
    assert img.size == (1280, 2000)
    # a rendered page, not a blank one: many distinct colours (text, bars, the three inlined charts)
    colours = img.resize((320, 500)).getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 200
    # the orange sparsity bars and histogram bars (#d9480f) were painted
    px = img.load()
    orange = sum(1 for yy in range(0, 2000, 4) for xx in range(0, 1280, 4)
                 if abs(px[xx, yy][0] - 0xd9) < 30 and abs(px[xx, yy][1] - 0x48) < 40 and px[xx, yy][2] < 80)
    assert orange > 50
    if os.environ.get("SECATEUR_KEEP_SCREENSHOT"):
        shutil.copy(shot, os.environ["SECATEUR_KEEP_SCREENSHOT"])


def test_bad_input():
    with pytest.raises(PruningError):
        report("not a model")
    r = report(small_cnn())
    with pytest.raises(PruningError):
        r.to_html("/tmp/x.html", before=42)


def test_structural_before_after(tmp_path):
    structured = pytest.importorskip("secateur.structured")
    m = small_cnn().eval()
    x = torch.randn(X)
    before = report(m, x)
    structured.prune_channels(m, x, ratio=0.5)
    r = report(m, x)
    assert r.total_params < before.total_params and r.macs < before.macs
    assert r.total_params == sum(p.numel() for p in m.parameters())
    r.to_html(tmp_path / "s.html", before=before)
    text = (tmp_path / "s.html").read_text()
    assert f"8x3x3x3 → {'x'.join(map(str, m[0].weight.shape))}" in text


def test_report_survives_nan_and_inf_weights(tmp_path):
    m = small_cnn()
    with torch.no_grad():
        m[8].weight[0, :3] = float("nan")
        m[8].weight[1, 0] = float("inf")
    before = copy.deepcopy(m.state_dict())
    r = report(m, torch.randn(X))
    rows = {row.name: row for row in r.rows}
    assert rows["8"].nonfinite == 4 and rows["0"].nonfinite == 0
    h = r.hists["8"]
    assert h["nan"] == 3 and h["inf"] == 1 and sum(h["counts"]) == m[8].weight.numel() - 4
    assert "4 parameters are NaN or inf, in 8 (4)" in str(r)
    assert Report.from_dict(json.loads(json.dumps(r.to_dict()))).rows == r.rows
    r.to_html(tmp_path / "r.html")
    assert "NaN or inf" in (tmp_path / "r.html").read_text()
    assert all(torch.equal(before[k].nan_to_num(), v.nan_to_num()) for k, v in m.state_dict().items())


@pytest.mark.parametrize("history", [5, "rows", {"round": 1}, [{"round": 1}, 3]])
def test_to_html_refuses_a_bad_history(tmp_path, history):
    with pytest.raises(PruningError, match="history must be a list of dicts"):
        report(small_cnn()).to_html(tmp_path / "r.html", history=history)
    assert not (tmp_path / "r.html").exists()
