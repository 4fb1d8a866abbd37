"""Size-attribute updates on models that cannot run here: the whole-model proof against the per-module one.

A model on meta, on a GPU or over ``verify.HERE_BYTES`` (a 7B model on the CPU) cannot get the numeric proof a size
update needs on a copy of the whole model; graph/local_proof.py runs it on a CPU copy of one module per class. This
script checks, on every model that runs here (the Hugging Face causal-LM registry, one timm model per timm module,
the torchvision classifiers; up to 30 M parameters), that the per-module proof takes what the whole-model proof takes and
nothing that is wrong: each model is planned twice (ratio 0.5, channel i scored i so both plans rank alike), once
as usual and once with ``HERE_BYTES = 0`` (every dry run on meta, proofs per module), and every plan whose updates
the per-module proof took is applied to a copy and checked against the oracle (``Plan.apply_checked``).
Then real-size configurations (Falcon-7B, OLMo-7B, StarCoderBase-1B) are planned on the meta device (no weights)
with and without the per-module proof.

    python benchmarks/bench_local_proof.py [--zoo hf timm tv] [--limit N] [--timeout 240]

Prints a table (models where the two plans differ, or where the per-module proof was used) and writes
benchmarks/results/local_proof.json.
"""
from __future__ import annotations

import argparse
import copy
import os
import signal
import sys
import time
import warnings

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(ROOT, "..", "src"), os.path.join(ROOT, "..", "tests"), ROOT]

from _results import write_results  # noqa: E402


def _models(zoo: str):
    import zoo_models as Z
    if zoo == "hf":
        for t in Z.hf_causal_lm_types():
            yield f"hf-auto:{t}", lambda t=t: Z.hf_auto_model(t)
        return
    if zoo == "tv":
        import torch
        import torchvision
        for n in torchvision.models.list_models(module=torchvision.models):
            def make(n=n):
                m = torchvision.models.get_model(n, weights=None).eval()
                if sum(p.numel() for p in m.parameters()) > 30e6:
                    return None, None
                size = 299 if n == "inception_v3" else 224
                return m, torch.randn(1, 3, size, size)
            yield f"tv:{n}", make
        return
    import timm
    for n in Z.timm_one_per_module():
        def make(n=n):
            m = timm.create_model(n, pretrained=False).eval()
            if sum(p.numel() for p in m.parameters()) > 30e6:  # as the zoo tests: small models only
                return None, None
            return m, Z.timm_input(m)
        yield f"timm:{n}", make


class _Timeout(Exception):
    pass


def _alarm(*_):
    raise _Timeout()


def compare(make, timeout: int) -> dict:
    """Both plans of one model, and the oracle error of the per-module one where it took updates."""
    import torch
    from secateur.graph import verify
    from secateur.structured import plan_channels
    from secateur.structured.proof import LOCAL_NOTE
    by_position = lambda g: torch.arange(g.size, dtype=torch.float)  # noqa: E731
    signal.alarm(timeout)
    try:
        torch.manual_seed(0)
        model, x = make()
        if x is None:
            return {"skipped": "does not build or run here"}
        t0 = time.perf_counter()
        whole = plan_channels(model, x, ratio=0.5, importance=by_position)
        t1 = time.perf_counter()
        here = verify.HERE_BYTES
        verify.HERE_BYTES = 0
        try:
            local = plan_channels(model, x, ratio=0.5, importance=by_position)
        finally:
            verify.HERE_BYTES = here
        t2 = time.perf_counter()
        rec = {"whole": whole.channels, "local": local.channels, "whole_updates": len(whole.attrs),
               "local_updates": len(local.attrs), "proven_per_module": LOCAL_NOTE in local.notes,
               "seconds_whole": round(t1 - t0, 2), "seconds_local": round(t2 - t1, 2)}
        if rec["proven_per_module"]:
            rec["oracle_error"] = local.apply_checked(copy.deepcopy(model), x)
        return rec
    except _Timeout:
        return {"error": f"timeout ({timeout} s)"}
    except Exception as e:  # noqa: BLE001 - a model the engine refuses is reported, not fatal
        return {"error": f"{type(e).__name__}: {str(e)[:200]}"}
    finally:
        signal.alarm(0)


def _meta_configs():
    """Real-size configurations whose plans need size updates: Falcon-7B (71 query heads, one key/value head:
    ``num_heads``), OLMo-7B (its LayerNorm without weights keeps ``normalized_shape``), StarCoderBase-1B
    (GPT-BigCode, multi-query: ``num_heads``)."""
    from transformers import (FalconConfig, FalconForCausalLM, GPTBigCodeConfig, GPTBigCodeForCausalLM, OlmoConfig,
                              OlmoForCausalLM)
    yield "falcon-7b", FalconForCausalLM, FalconConfig(
        hidden_size=4544, num_attention_heads=71, num_hidden_layers=32, multi_query=True, parallel_attn=True,
        new_decoder_architecture=False, vocab_size=65024, use_cache=False, alibi=False, bias=False)
    yield "olmo-7b", OlmoForCausalLM, OlmoConfig(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, vocab_size=50304,
        use_cache=False)
    yield "starcoderbase-1b", GPTBigCodeForCausalLM, GPTBigCodeConfig(
        n_embd=2048, n_layer=24, n_head=16, n_inner=8192, vocab_size=49152, multi_query=True, use_cache=False,
        n_positions=8192)


def on_meta() -> dict:
    """Each real-size configuration planned on the meta device (no weights), ratio 0.25, with and without the
    per-module proof."""
    import torch
    from secateur.graph import local_proof
    from secateur.structured import plan_channels
    out = {}
    for name, cls, cfg in _meta_configs():
        with torch.device("meta"):
            model = cls(cfg).eval()
        x = {"input_ids": torch.randint(0, 100, (1, 16), device="meta")}
        prove = local_proof.prove
        for how, fn in (("without", lambda *a, **k: None), ("with", prove)):
            local_proof.prove = fn
            try:
                t = time.perf_counter()
                plan = plan_channels(model, x, ratio=0.25, importance="random")
                out.setdefault(name, {})[how] = {
                    "seconds": round(time.perf_counter() - t, 2), "groups": len(plan.groups),
                    "groups_pruned": sum(1 for _, c in plan.choices if c.numel()), "channels": plan.channels,
                    "size_updates": len(plan.attrs)}
            finally:
                local_proof.prove = prove
        print(f"{name} on meta, ratio 0.25: {out[name]}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--zoo", nargs="+", default=["hf", "timm", "tv"], choices=["hf", "timm", "tv"])
    ap.add_argument("--limit", type=int, default=None, help="at most this many models per zoo")
    ap.add_argument("--timeout", type=int, default=240, help="seconds per model (both plans and the oracle)")
    ap.add_argument("--out", default=os.path.join(ROOT, "results", "local_proof.json"))
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    import torch
    torch.set_num_threads(1)
    signal.signal(signal.SIGALRM, _alarm)
    rows = {}
    for zoo in args.zoo:
        for i, (name, make) in enumerate(_models(zoo)):
            if args.limit is not None and i >= args.limit:
                break
            rows[name] = compare(make, args.timeout)
            r = rows[name]
            if "whole" in r and (r["whole"] != r["local"] or r["proven_per_module"]):
                err = r.get("oracle_error")
                print(f"{name:34s} whole {r['whole']:6d} ({r['whole_updates']} updates)  per-module "
                      f"{r['local']:6d} ({r['local_updates']} updates, proven per module: "
                      f"{r['proven_per_module']})  oracle {'-' if err is None else f'{err:.1e}'}", flush=True)
            elif "error" in r:
                print(f"{name:34s} {r['error']}", flush=True)
    done = [r for r in rows.values() if "whole" in r]
    summary = {
        "models": len(done),
        "same_plan": sum(r["whole"] == r["local"] for r in done),
        "whole_has_updates": sum(r["whole_updates"] > 0 for r in done),
        "proven_per_module": sum(r["proven_per_module"] for r in done),
        "worst_oracle_error": max((r["oracle_error"] for r in done if "oracle_error" in r), default=None),
        "local_removes_less": sorted(n for n, r in rows.items() if "whole" in r and r["local"] < r["whole"]),
        "local_removes_more": sorted(n for n, r in rows.items() if "whole" in r and r["local"] > r["whole"]),
    }
    print(summary)
    meta = on_meta()
    write_results(args.out, {"summary": summary, "on_meta": meta, "models": rows})


if __name__ == "__main__":
    main()
