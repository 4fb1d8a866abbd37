"""Shared pieces of the tests' oracles (imported as ``from helpers import ...``: pytest puts this folder on the path)."""
import copy

import torch


def _outputs(model, x, plan, run, zeroed):
    ref = copy.deepcopy(model)
    plan.zero_consumers(ref)
    with torch.no_grad():
        first = run(ref if zeroed else model, x)
        with plan.kept_norms(ref):
            want = run(ref, x)
        plan.apply(model)
        got = run(model, x)
    return first, want, got


def pruned_vs_reference(model, x, plan, run=lambda m, x: m(x)):
    """(unpruned, reference, pruned) outputs. The reference is the original model with the chosen channels
    zeroed where they enter their consumers, its norms over pruned channels computed over the kept ones
    (``plan.kept_norms``); ``model`` is pruned in place by ``plan``."""
    return _outputs(model, x, plan, run, zeroed=False)


def zeroed_reference_pruned(model, x, plan, run=lambda m, x: m(x)):
    """(zeroed, reference, pruned) outputs: as ``pruned_vs_reference``, with the original whose chosen channels are
    only zeroed (no kept-channel norms) in place of the unpruned output. Where removal is not zeroing (a norm over
    the pruned channels), a test asserts that ``zeroed`` differs from ``pruned``: the reference is then needed and
    the comparison can fail."""
    return _outputs(model, x, plan, run, zeroed=True)


def assert_reloads(make, model, x, tmp_path, run=lambda m, x: m(x)):
    """``secateur.save`` then ``secateur.load`` onto a fresh ``make()``: the outputs are bit-identical."""
    import secateur
    secateur.save(model, tmp_path / "m.safetensors")
    torch.manual_seed(0)
    fresh = secateur.load(make().eval(), tmp_path / "m.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(run(fresh, x), run(model, x), rtol=0, atol=0)


def layer_inputs(model, module, batches):
    """All inputs of ``module`` over FULL-model forwards of ``batches``, as ``[tokens, in]``."""
    xs = []
    h = module.register_forward_hook(lambda m, a, o: xs.append(a[0].detach().reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for b in batches:
            model(b)
    h.remove()
    return torch.cat(xs)


def assert_oracle(model, x, **kw):
    """Plan with ``plan_channels(**kw)``, prune ``model`` in place, and check it computes the reference."""
    from secateur.structured import plan_channels
    plan = plan_channels(model, x, **kw)
    _, want, got = pruned_vs_reference(model, x, plan)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    return plan


def randomize_bn(*bns, low=0.0, high=1.0):
    """BatchNorms that are not the identity at init: scales in [low, high), running statistics away from 0/1, so
    channel choices by BN scale and the oracle's comparison mean something."""
    with torch.no_grad():
        for bn in bns:
            bn.weight.uniform_(low, high)
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2)


def prune_causal_lm(make, tmp_path=None, below=0.35, low=0):
    """A Hugging Face causal LM from ``make()`` planned at ratio 0.5 and pruned in place: the pruned logits equal
    the oracle's reference, MACs end under ``below`` of dense, and (with ``tmp_path``) save/load onto a fresh
    ``make()`` is bit-exact. Returns (model, plan) for the caller's own checks."""
    from secateur.metrics import count_macs
    from secateur.structured import plan_channels
    torch.manual_seed(0)
    model, x = make().eval(), {"input_ids": torch.randint(low, 100, (1, 6))}
    run = lambda m, x: m(**x).logits  # noqa: E731
    macs0 = count_macs(model, x)
    plan = plan_channels(model, x, ratio=0.5)
    _, want, got = pruned_vs_reference(model, x, plan, run)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert count_macs(model, x) < below * macs0
    if tmp_path is not None:
        assert_reloads(make, model, x, tmp_path, run)
    return model, plan


def first_output(out):
    """The first tensor of a model's output: the tensor itself, a dict's first value (Hugging Face outputs), or the
    first element of a tuple."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        return next(iter(out.values()))
    return out[0]
