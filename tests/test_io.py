"""save / load: exact round trips (masked, finalized, tied, Hugging Face), no pickle, and corruption."""
import json
import os
import pickle

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import secateur
from secateur import io as sio
from secateur.errors import PruningError
from secateur.masks import get_mask, masks_of, original


def net(seed=1, hidden=32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 6 * 6, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def trained_pruned(**kw):
    m = net(seed=7)
    x = torch.randn(4, 3, 8, 8)
    m.train()
    m(x)  # BatchNorm running stats differ from a fresh model's
    secateur.prune(m, 0.6, **kw)
    return m.eval()


X = torch.randn(5, 3, 8, 8)


def same_outputs(a, b, x=X):
    a.eval(), b.eval()
    with torch.no_grad():
        return torch.equal(a(x), b(x))


def test_masked_round_trip_is_exact(tmp_path):
    m = trained_pruned()
    with torch.no_grad():
        original(m[4], "weight").add_(0.5)  # un-masked raw values must survive too
    sio.save(m, tmp_path / "m.safetensors")
    fresh = net(seed=99)
    assert not same_outputs(m, fresh)
    back = sio.load(fresh, tmp_path / "m.safetensors")
    assert back is fresh and same_outputs(m, back)
    a, b = masks_of(m), masks_of(back)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for i in (0, 4, 6):
        assert torch.equal(original(m[i], "weight"), original(back[i], "weight"))
    sa, sb = m.state_dict(), back.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_nm_and_block_masks_round_trip(tmp_path):
    m = net()
    secateur.prune(m, pattern="2:4", targets=["4", "6"])
    secateur.prune(m, 0.5, pattern="rows", targets=["0"])
    sio.save(m, tmp_path / "m.st")
    back = sio.load(net(seed=3), tmp_path / "m.st")
    assert same_outputs(m, back)
    assert torch.equal(get_mask(back[4], "weight"), get_mask(m[4], "weight"))


def test_finalized_round_trip_is_exact(tmp_path):
    m = secateur.finalize(trained_pruned())
    sio.save(m, tmp_path / "m.st")
    back = sio.load(net(seed=5), tmp_path / "m.st")
    assert not secateur.is_pruned(back) and same_outputs(m, back)


def test_masks_are_bit_packed(tmp_path):
    m = nn.Linear(512, 512, bias=False)
    secateur.prune(m, 0.5)
    sio.save(m, tmp_path / "m.st")
    with safe_open(tmp_path / "m.st", "pt") as f:
        packed = f.get_tensor(sio.MASK_PREFIX + "weight")
    assert packed.dtype == torch.uint8 and packed.numel() == 512 * 512 // 8
    size = os.path.getsize(tmp_path / "m.st")
    assert size < 512 * 512 * 4 * 1.2  # weights + 1 bit per weight, not a byte per weight plus extras


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.mid = nn.Linear(8, 8)
        self.head = nn.Linear(8, 20, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.relu(self.mid(self.emb(ids))))


def test_tied_weights_stored_once_and_stay_tied(tmp_path):
    m = Tied()
    secateur.prune(m, 0.5, targets=["mid"])
    sio.save(m, tmp_path / "t.st")
    with safe_open(tmp_path / "t.st", "pt") as f:
        keys = set(f.keys())
        desc = json.loads(f.metadata()["secateur"])
    assert len({"emb.weight", "head.weight"} & keys) == 1 and desc["aliases"]
    torch.manual_seed(123)
    back = sio.load(Tied(), tmp_path / "t.st")
    ids = torch.randint(0, 20, (3, 5))
    assert torch.equal(m(ids), back(ids))
    assert back.head.weight is back.emb.weight


def test_hugging_face_model_round_trip(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16)
    torch.manual_seed(0)
    m = transformers.BertForMaskedLM(cfg).eval()
    secateur.prune(m, 0.5, scope="global")
    m.config.secateur_note = "pruned"  # a config change recorded in the file
    sio.save(m, tmp_path / "bert.st")
    torch.manual_seed(1)
    fresh = transformers.BertForMaskedLM(transformers.BertConfig(**{k: v for k, v in cfg.to_dict().items()
                                                                  if k != "secateur_note"})).eval()
    back = sio.load(fresh, tmp_path / "bert.st")
    ids = torch.randint(0, 60, (2, 7))
    with torch.no_grad():
        assert torch.equal(m(input_ids=ids).logits, back(input_ids=ids).logits)
    assert masks_of(back).keys() == masks_of(m).keys()


def test_load_never_unpickles(tmp_path, monkeypatch):
    m = trained_pruned()
    sio.save(m, tmp_path / "m.st")

    def boom(*a, **k):
        raise AssertionError("pickle used")
    monkeypatch.setattr(torch, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "Unpickler", boom)
    assert same_outputs(m, sio.load(net(seed=2), tmp_path / "m.st"))


# ---------------------------------------------------------------------------------------- corruption


def untouched_check(fn, fresh=None):
    """Run ``fn(fresh)`` expecting a PruningError, and check the fresh model was not modified."""
    fresh = net(seed=11) if fresh is None else fresh
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(PruningError) as info:
        fn(fresh)
    after = fresh.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not secateur.is_pruned(fresh)
    return str(info.value)


@pytest.fixture
def saved(tmp_path):
    p = tmp_path / "m.st"
    sio.save(trained_pruned(), p)
    return p


def test_truncated_file(saved):
    data = saved.read_bytes()
    for cut in (len(data) - 100, len(data) // 2, 20, 3):
        saved.write_bytes(data[:cut])
        msg = untouched_check(lambda f: sio.load(f, saved))
        assert "truncated" in msg or "checksum" in msg


def test_flipped_payload_byte(saved):
    data = bytearray(saved.read_bytes())
    data[-10] ^= 0x01
    saved.write_bytes(bytes(data))
    assert "checksum" in untouched_check(lambda f: sio.load(f, saved))


def _rewrite(path, edit_desc=None, edit_tensors=None, keep_sum=True):
    with safe_open(path, "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    desc = json.loads(meta["secateur"])
    if edit_desc:
        edit_desc(desc)
    if edit_tensors:
        edit_tensors(tensors)
    meta["secateur"] = json.dumps(desc, sort_keys=True)
    if not keep_sum:
        meta["secateur.sha256"] = sio._checksum(meta["secateur"], tensors)
    save_file(tensors, path, metadata=meta)


def test_tampered_description(saved):
    def widen(d):
        d["masks"]["4.weight"]["kept"] = 0
    _rewrite(saved, widen)
    assert "checksum" in untouched_check(lambda f: sio.load(f, saved))


def test_tampered_mask_with_recomputed_checksum_still_checked(saved):
    def shrink(t):
        t[sio.MASK_PREFIX + "4.weight"] = t[sio.MASK_PREFIX + "4.weight"][:-3].clone()
    _rewrite(saved, edit_tensors=shrink, keep_sum=False)
    assert "packed mask" in untouched_check(lambda f: sio.load(f, saved))


def test_malformed_description_with_valid_checksum(saved):
    def garble(d):
        d["masks"] = ["not", "a", "dict"]
    _rewrite(saved, garble, keep_sum=False)
    assert "malformed" in untouched_check(lambda f: sio.load(f, saved))


def test_other_architecture(tmp_path, saved):
    msg = untouched_check(lambda f: sio.load(f, saved), fresh=net(hidden=16))
    assert "shape differs" in msg and "[4." in msg
    other = tmp_path / "lin.st"
    sio.save(nn.Linear(3, 3), other)
    assert "different model class" in untouched_check(lambda f: sio.load(f, other))
    deeper = tmp_path / "deeper.st"
    sio.save(nn.Sequential(*net(), nn.Linear(10, 2)), deeper)
    assert "does not match this architecture" in untouched_check(lambda f: sio.load(f, deeper))


def test_foreign_safetensors_and_missing_file(tmp_path):
    p = tmp_path / "plain.st"
    save_file({"w": torch.zeros(2)}, p)
    assert "not written by secateur" in untouched_check(lambda f: sio.load(f, p))
    assert "no such file" in untouched_check(lambda f: sio.load(f, tmp_path / "nope.st"))


def test_atomic_write_keeps_previous_file(tmp_path, monkeypatch):
    p = tmp_path / "m.st"
    sio.save(net(seed=1), p)
    good = p.read_bytes()
    import safetensors.torch as st

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr(st, "save_file", crash)
    with pytest.raises(OSError):
        sio.save(trained_pruned(), p)
    assert p.read_bytes() == good
    assert os.listdir(tmp_path) == ["m.st"]  # no temp file left behind


class _Double(nn.Module):
    def forward(self, w):
        return w * 2


def test_foreign_parametrization_is_refused_by_save_and_load(tmp_path):
    from torch.nn.utils import parametrize

    def with_double(seed=11):
        m = net(seed=seed)
        parametrize.register_parametrization(m[4], "weight", _Double())
        return m
    # its raw stored tensor would be saved as the weight and load silently wrong (outputs off by the factor)
    msg = untouched_check(lambda f: sio.save(f, tmp_path / "f.st"), fresh=with_double())
    assert "[4.weight] cannot save a tensor under a parametrization secateur did not add (value='_Double')" in msg
    assert "remove_parametrizations(model.get_submodule('4'), 'weight')" in msg and not os.listdir(tmp_path)
    sio.save(trained_pruned(), tmp_path / "m.st")
    msg = untouched_check(lambda f: sio.load(f, tmp_path / "m.st"), fresh=with_double())
    assert "[4.weight] cannot load into a tensor under a parametrization" in msg
    m = with_double()
    assert type(m[4].parametrizations.weight[0]) is _Double  # untouched: still the user's


def test_meta_model_and_unwritable_path_are_refused(tmp_path):
    meta = net().to("meta")
    with pytest.raises(PruningError, match=r"\[0.weight\] cannot save a tensor on the meta device"):
        sio.save(meta, tmp_path / "m.st")
    msg = untouched_check(lambda f: sio.save(f, "/proc/no-such-dir/m.st"))
    assert msg.startswith("[/proc/no-such-dir/m.st] cannot write a file there")
    assert not os.listdir(tmp_path)




def test_structurally_pruned_round_trip_is_exact(tmp_path):
    structured = pytest.importorskip("secateur.structured")
    m = trained_pruned()  # masks first ...
    secateur.finalize(m)
    structured.prune_channels(m, X, ratio=0.5)  # ... then channels physically removed
    secateur.prune(m, 0.3)  # and masks again on the smaller model
    assert m[0].out_channels < 8 and secateur.is_pruned(m)
    sio.save(m, tmp_path / "s.st")
    back = sio.load(net(seed=4), tmp_path / "s.st")
    assert back[0].weight.shape == m[0].weight.shape and back[4].in_features == m[4].in_features
    assert same_outputs(m, back)
    assert back._secateur_structure == m._secateur_structure


def test_structural_file_refuses_a_smaller_fresh_model(tmp_path):
    structured = pytest.importorskip("secateur.structured")
    m = net().eval()
    structured.prune_channels(m, X, ratio=0.5)
    sio.save(m, tmp_path / "s.st")
    msg = untouched_check(lambda f: sio.load(f, tmp_path / "s.st"), fresh=net(hidden=8))
    assert "structure does not fit" in msg and "[4." in msg


def test_hugging_face_structural_round_trip_updates_config(tmp_path):
    transformers = pytest.importorskip("transformers")
    structured = pytest.importorskip("secateur.structured")
    kw = dict(vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
              max_position_embeddings=16)
    torch.manual_seed(0)
    m = transformers.BertForMaskedLM(transformers.BertConfig(**kw)).eval()
    ids = torch.randint(0, 60, (2, 7))
    structured.prune_channels(m, {"input_ids": ids}, ratio=0.5)
    assert m.config.intermediate_size < 32
    sio.save(m, tmp_path / "bert.st")
    torch.manual_seed(1)
    fresh = transformers.BertForMaskedLM(transformers.BertConfig(**kw)).eval()
    back = sio.load(fresh, tmp_path / "bert.st")
    assert back.config.intermediate_size == m.config.intermediate_size
    assert back.config.num_attention_heads == m.config.num_attention_heads
    with torch.no_grad():
        assert torch.equal(m(input_ids=ids).logits, back(input_ids=ids).logits)
