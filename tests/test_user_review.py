"""Bugs a first user hit, each held by a test: bad input fails with a PruningError that names the
tensor and value, before the model changes; CLI options mean what the API's do."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import secateur
from secateur import PruningError
from secateur.cli import main


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 8))


def untouched(fn) -> str:
    """Run ``fn(model)``, expect a PruningError, check the model is exactly as it was; the message."""
    m = net()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(PruningError) as e:
        fn(m)
    assert not secateur.is_pruned(m)
    after = m.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    return str(e.value)


def test_nm_dim_out_of_range_is_a_pruning_error():
    msg = untouched(lambda m: secateur.prune(m, pattern=secateur.NM(2, 4, dim=7)))
    assert "0.weight" in msg and "7" in msg


def test_exclude_name_that_matches_nothing_is_an_error():
    # a typo in exclude would otherwise prune the very layer the user meant to protect
    msg = untouched(lambda m: secateur.prune(m, 0.5, exclude=["3.weight.typo"]))
    assert "3.weight.typo" in msg


def test_exclude_takes_globs_and_tensor_names_like_amount_keys():
    m = net()
    out = secateur.prune(m, 0.5, exclude=["3*"])
    assert set(out) == {"0.weight"}
    m = net()
    out = secateur.prune(m, 0.5, include_bias=True, exclude=["3.bias"])
    assert set(out) == {"0.weight", "0.bias", "3.weight"}
    m = net()  # an exact module name still works
    assert set(secateur.prune(m, 0.5, exclude=["0"])) == {"3.weight"}


def test_exclude_everything_is_an_error():
    untouched(lambda m: secateur.prune(m, 0.5, exclude=["*"]))


def test_count_larger_than_the_tensor_is_an_error():
    # torch.nn.utils.prune refuses too; silently pruning the whole tensor hides a wrong unit
    msg = untouched(lambda m: secateur.prune(m, count=10_000))
    assert "0.weight" in msg and "10000" in msg
    msg = untouched(lambda m: secateur.prune(m, count=10_000, scope="global"))
    assert "10000" in msg
    m = net()  # exactly the whole tensor is allowed
    assert secateur.prune(m, count=8 * 4 * 9, targets=["0"]) == {"0.weight": 1.0}


def test_random_seed_must_be_an_integer():
    msg = untouched(lambda m: secateur.prune(m, 0.5, criterion=secateur.Random("x")))
    assert "'x'" in msg


def test_integer_scores_from_a_criterion_function_still_prune_exactly():
    m = net()
    out = secateur.prune(m, 0.5, criterion=lambda t, n: (t.abs() * 1000).long())
    assert all(abs(v - 0.5) < 1e-9 for v in out.values())


# ------------------------------------------------------------------------------------------- CLI


def _factory() -> nn.Module:
    return net()


FACTORY = f"{__name__}:_factory"


def test_cli_nm_pattern_with_a_ratio_is_refused(tmp_path, capsys):
    rc = main(["prune", FACTORY, "--input-shape", "1,4,6,6", "--pattern", "2:4", "--ratio", "0.9",
               "-o", str(tmp_path / "m.st")])
    assert rc == 1 and not (tmp_path / "m.st").exists()
    assert "2:4" in capsys.readouterr().err


def test_cli_structural_with_a_pattern_is_refused(tmp_path, capsys):
    rc = main(["prune", FACTORY, "--input-shape", "1,4,6,6", "--structural", "--pattern", "2:4",
               "-o", str(tmp_path / "m.st")])
    assert rc == 1 and not (tmp_path / "m.st").exists()
    assert "--pattern" in capsys.readouterr().err


def test_cli_criterion_option_and_exclude(tmp_path):
    out = tmp_path / "m.st"
    rc = main(["prune", FACTORY, "--input-shape", "1,4,6,6", "--criterion", "l2", "--amount", "0.5",
               "--exclude", "3", "-o", str(out)])
    assert rc == 0
    back = secateur.load(net(), out)
    assert set(secateur.masks_of(back)) == {"0.weight"}


def test_cli_wrong_input_shape_is_a_clear_error(tmp_path, capsys):
    rc = main(["prune", FACTORY, "--input-shape", "1,3,6,6", "-o", str(tmp_path / "m.st")])
    err = capsys.readouterr().err
    assert rc == 1, err
    assert "(1, 3, 6, 6)" in err and "--input-shape" in err and "internal error" not in err


def test_target_names_that_do_not_exist_are_named():
    # targets=["3", "typo"] would otherwise prune layer 3 and silently skip the typo
    msg = untouched(lambda m: secateur.prune(m, 0.5, targets=["3", "typo"]))
    assert "value=['typo']" in msg


def test_cli_sensitivity_checks_allocation_options_before_the_scan(tmp_path, capsys, monkeypatch):
    import sys
    sens = sys.modules["secateur.sensitivity"]  # the attribute secateur.sensitivity is the function

    def scan(*a, **k):
        raise AssertionError("the scan ran before the options were checked")
    monkeypatch.setattr(sens, "sensitivity", scan)
    for extra in (["--fraction", "2"], ["--fraction", "0.5", "--align", "0"], ["-o", str(tmp_path / "m.st")]):
        rc = main(["sensitivity", FACTORY, "--input-shape", "1,4,6,6", *extra])
        assert rc == 1, (extra, capsys.readouterr().err)


def test_cli_fidelity_baseline_prints_as_zero(capsys):
    assert main(["sensitivity", FACTORY, "--input-shape", "1,4,6,6", "--ratios", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "baseline metric: 0" in out and "-0" not in out.split("baseline metric:")[1].split()[0]


def test_every_public_name_has_a_docstring_that_says_when_to_use_it():
    import inspect
    for name in secateur.__all__:
        if name == "__version__":
            continue
        doc = inspect.getdoc(getattr(secateur, name)) or ""
        assert len(doc.split()) >= 12, (name, doc)


def test_import_has_no_heavy_side_effects():
    import subprocess
    import sys
    code = ("import sys, secateur; heavy = [m for m in ('matplotlib', 'transformers', 'torchvision', 'timm', "
            "'onnx', 'onnxruntime', 'sklearn', 'pytorch_lightning', 'lightning') if m in sys.modules]; "
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_cli_structural_pruning_of_a_masked_file(tmp_path, capsys):
    # the structural engine works on plain weights: a saved masked model is finalized first
    masked, out = tmp_path / "a.st", tmp_path / "b.st"
    assert main(["prune", FACTORY, "--input-shape", "1,4,6,6", "--ratio", "0.5", "-o", str(masked)]) == 0
    rc = main(["prune", str(masked), "--input-shape", "1,4,6,6", "--structural", "--ratio", "0.5",
               "-o", str(out)])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "finaliz" in err
    m = secateur.load(net(), masked)
    secateur.finalize(m)
    x = torch.randn(3, 4, 6, 6)
    back = secateur.load(net(), out)
    assert not secateur.is_pruned(back) and back[0].out_channels < 8
    # every channel kept computes what it computed in the masked model
    assert back(x).shape == m(x).shape


def test_cli_output_that_is_a_folder_is_a_clear_error(tmp_path, capsys):
    rc = main(["prune", FACTORY, "--input-shape", "1,4,6,6", "-o", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 1 and "internal error" not in err and str(tmp_path) in err


def test_cli_missing_saved_file_says_no_such_file(tmp_path, capsys):
    rc = main(["report", str(tmp_path / "gone.safetensors")])
    err = capsys.readouterr().err
    assert rc == 1 and "no such file" in err and "gone.safetensors" in err


def test_cli_sensitivity_takes_the_criterion(tmp_path):
    # random scores remove different weights than magnitude: the option must reach the scan
    js = {c: tmp_path / f"{c}.json" for c in ("l1", "random")}
    for c, path in js.items():
        assert main(["sensitivity", FACTORY, "--input-shape", "1,4,6,6", "--ratios", "0.5", "--criterion", c,
                     "--json", str(path)]) == 0
    import json
    curves = {c: json.loads(p.read_text())["curves"] for c, p in js.items()}
    assert curves["l1"] != curves["random"]


# ---------------------------------------------------------------------------------------- save/load


def test_load_into_a_model_with_other_masks_gives_the_saved_model(tmp_path):
    m = net()
    secateur.prune(m, 0.5)
    secateur.save(m, tmp_path / "m.st")
    q = net()
    secateur.prune(q, 0.5, targets=["0"], include_bias=True)  # a mask the file does not have
    secateur.load(q, tmp_path / "m.st")
    assert sorted(secateur.masks_of(q)) == sorted(secateur.masks_of(m))
    x = torch.randn(2, 4, 6, 6)
    assert torch.equal(q(x), m(x))


def test_save_and_load_bad_arguments_are_pruning_errors(tmp_path):
    m = net()
    secateur.save(m, tmp_path / "m.st")
    with pytest.raises(PruningError, match="nn.Module"):
        secateur.load("not a model", tmp_path / "m.st")
    with pytest.raises(PruningError, match="path"):
        secateur.save(m, 3)


def test_export_with_inputs_the_model_rejects_is_a_pruning_error(tmp_path):
    pytest.importorskip("onnx")
    m = net()
    with pytest.raises(PruningError, match=r"\(1, 5\)"):
        secateur.export_onnx(m, torch.randn(1, 5), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_sensitivity_metric_that_is_not_a_number_is_a_pruning_error():
    m = net()
    with pytest.raises(PruningError, match="'x'"):
        secateur.sensitivity(m, lambda model: "x", [0.5], progress=False)
    assert not secateur.is_pruned(m)


# ------------------------------------------------------------------------------------------ tied weights


class Tied(nn.Module):
    """An embedding and an output Linear sharing one weight (GPT-2 / BERT heads do this)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(16, 8)
        self.mid = nn.Linear(8, 8)
        self.head = nn.Linear(8, 16, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(self.mid(self.emb(ids)))


def test_tied_weight_named_by_the_user_is_refused_with_both_names():
    # a mask on one user of a shared tensor would zero the other user too at finalize: masked != finalized
    m = Tied()
    with pytest.raises(PruningError) as e:
        secateur.prune(m, 0.5, targets=["mid", "head"])
    assert "head.weight" in str(e.value) and "emb.weight" in str(e.value)
    assert not secateur.is_pruned(m)


def test_default_targets_skip_a_tied_weight_so_masked_equals_finalized():
    m = Tied()
    with pytest.warns(UserWarning, match="head.weight"):
        out = secateur.prune(m, 0.5)
    assert set(out) == {"mid.weight"}
    ids = torch.randint(0, 16, (2, 5))
    a = m(ids)
    secateur.finalize(m)
    assert torch.equal(a, m(ids))


def _gpt2():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=16,
                                  bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def test_gpt2_conv1d_layers_are_default_targets_and_nm_runs_along_their_inputs():
    m = _gpt2()
    with pytest.warns(UserWarning, match="lm_head.weight"):
        out = secateur.prune(m, pattern="2:4")
    assert "transformer.h.0.attn.c_attn.weight" in out and "lm_head.weight" not in out
    w = m.transformer.h[0].mlp.c_fc.weight  # HF Conv1D: (in, out), inputs along dim 0
    groups = (w != 0).reshape(w.shape[0] // 4, 4, w.shape[1]).sum(1)
    assert bool((groups == 2).all())
    ids = torch.randint(0, 64, (2, 6))
    with torch.no_grad():
        a = m(ids).logits
        secateur.finalize(m)
        assert torch.equal(a, m(ids).logits)


def test_set_mask_error_names_the_module_type_and_tensor():
    m = net()
    with pytest.raises(PruningError, match=r"\[Conv2d\.weight\]"):
        secateur.set_mask(m[0], "weight", torch.ones(3, dtype=torch.bool))


def test_to_semi_structured_needs_a_module():
    from secateur.semi_structured import to_semi_structured
    with pytest.raises(PruningError, match="nn.Module"):
        to_semi_structured("model")


def test_report_counts_a_tied_tensor_once():
    m = Tied()
    rep = secateur.report(m, torch.randint(0, 16, (2, 5)))
    unique = sum(p.numel() for p in m.parameters())  # parameters() yields a shared tensor once
    assert rep.total_params == unique
    assert sum(r.params for r in rep.rows) == rep.total_params
    head = next(r for r in rep.rows if r.name == "head")
    assert head.macs == 2 * 5 * 16 * 8  # the layer's compute is still counted


def test_sensitivity_skips_a_tied_tensor_like_prune():
    m = Tied()
    ids = torch.randint(0, 16, (2, 5))
    with pytest.warns(UserWarning, match="head.weight"):
        res = secateur.sensitivity(m, lambda model: float(model(ids).detach().sum()), [0.5], progress=False)
    assert set(res.curves) == {"mid"} and not secateur.is_pruned(m)


def test_prune_llm_handles_gpt2_conv1d():
    # the Conv1D layers (weight (in, out)) are pruned along their inputs; a one-block list is named explicitly
    from secateur.llm import prune_llm
    m = _gpt2()
    rep = prune_llm(m, [torch.randint(0, 64, (2, 8))], method="wanda", pattern="2:4", blocks="transformer.h",
                    progress=False)
    assert len(rep.layers) == 4 and abs(rep.total_sparsity - 0.5) < 1e-9
    w = m.transformer.h[0].mlp.c_fc.weight
    assert bool(((w != 0).reshape(w.shape[0] // 4, 4, w.shape[1]).sum(1) <= 2).all())


def test_cli_threshold_matches_the_api(tmp_path):
    out = tmp_path / "m.st"
    assert main(["prune", FACTORY, "--input-shape", "1,4,6,6", "--threshold", "0.05", "-o", str(out)]) == 0
    back = secateur.load(net(), out)
    ref = net()
    secateur.prune(ref, threshold=0.05)
    got, want = secateur.masks_of(back), secateur.masks_of(ref)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
