"""The demo end to end on digits (fast), with bounds a broken pruner could not meet."""
import json

import pytest
import torch

import secateur as S
from secateur.demo import accuracy, run_demo, seed_mlp, train


def test_demo_runs_end_to_end_on_digits(tmp_path):
    rows = run_demo(epochs=15, data="digits", out_dir=tmp_path, hidden=64)
    by = {r.step: r for r in rows}
    dense, tuned = rows[0], by["fine-tuned, masks held"]
    assert dense.accuracy > 0.85
    assert tuned.accuracy > 0.85 and tuned.accuracy >= dense.accuracy - 0.05
    assert all(v == pytest.approx(0.6, abs=1e-3) for v in tuned.layer_sparsity.values())
    # same budget both ways (per-layer rounding may differ by one weight per layer)
    assert abs(rows[-1].nonzero - round(0.1 * dense.total)) <= 0
    assert abs(rows[-3].nonzero - round(0.1 * dense.total)) <= 3
    assert rows[-1].accuracy > 0.8
    saved = json.loads((tmp_path / "demo.json").read_text())
    assert [r["step"] for r in saved] == [r.step for r in rows]


def test_magnitude_beats_pruning_the_largest_weights():
    """Negative control: the same budget spent on the *largest* weights destroys the model."""
    from secateur.data import load_digits
    ds = load_digits()
    torch.manual_seed(0)
    model = seed_mlp(64, 64, 10)
    train(model, ds.x_train, ds.y_train, epochs=5)
    import copy
    good, bad = copy.deepcopy(model), copy.deepcopy(model)
    S.prune(good, 0.6)
    S.prune(bad, 0.6, criterion=lambda w, name: -w.abs())
    assert accuracy(good, ds.x_test, ds.y_test) > accuracy(bad, ds.x_test, ds.y_test) + 0.2


def test_demo_rejects_bad_ratio(tmp_path):
    with pytest.raises(S.PruningError, match="ratio"):
        run_demo(ratio=1.5, data="digits", out_dir=tmp_path)


@pytest.mark.parametrize("kw, match", [
    (dict(data="cifar"), "unknown demo data set"),
    (dict(epochs=-1), "epochs"),
    (dict(global_ratio="0.9"), "global_ratio"),
])
def test_demo_rejects_bad_options(tmp_path, kw, match):
    with pytest.raises(S.PruningError, match=match):
        run_demo(**{"data": "digits", "out_dir": tmp_path, **kw})


def test_demo_out_on_an_existing_file_says_which_file_and_what_to_do(tmp_path, capsys):
    from secateur.cli import main
    (tmp_path / "mlp.st").write_bytes(b"x")
    for out in (tmp_path / "mlp.st", tmp_path / "mlp.st" / "sub"):
        with pytest.raises(S.PruningError, match=r"output folder cannot be created: '.*mlp.st' is a file.*--out"):
            run_demo(data="digits", out_dir=out)
    assert main(["demo", "--data", "digits", "--out", str(tmp_path / "mlp.st")]) == 1
    err = capsys.readouterr().err
    assert "mlp.st' is a file" in err and "choose another output folder" in err
    assert (tmp_path / "mlp.st").read_bytes() == b"x"
