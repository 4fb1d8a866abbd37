"""How deeply does secateur prune the timm and Hugging Face zoos? (issue #3)

Passing the oracle is not enough: where the engine does not understand an op it keeps channels (safe), and the
model comes out barely smaller. Per model (the test suite's selection: one timm model per timm module at the
smallest input it accepts, and the Hugging Face families with small random configs), in its own subprocess with a
timeout: ``plan_channels(model, x, ratio=0.5)`` then apply, and record dense MACs, MACs and params after / dense,
the plan's notes, time, and the oracle error (pruned model vs the original with the chosen channels zeroed at
their consumers, tests/helpers.py). Torch-Pruning's MACs fraction on the same timm model, same ratio, when it runs.
Prints a table sorted by MACs fraction and writes benchmarks/results/zoo_depth.json.

    python benchmarks/bench_zoo_depth.py [--models resnet18 hf:bert] [--timeout 120] [--no-peer]
    python benchmarks/bench_zoo_depth.py --hf-causal-lm   # every causal LM type in transformers' registry
    python benchmarks/bench_zoo_depth.py --hf-causal-lm --moe   # only its mixture-of-experts types
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(ROOT, "..", "src"), os.path.join(ROOT, "..", "tests"), ROOT]

from _results import write_results  # noqa: E402
from bench_structural_zoo import _classifier, run  # noqa: E402 - same subprocess-with-timeout runner

DEEP = 0.4  # MACs after / dense above this at ratio 0.5 counts as "pruned shallowly"


def _build(name):
    """(model, example input) for ``name``: ``hf:<family>`` or a timm model name."""
    import torch
    import zoo_models as Z
    torch.manual_seed(0)
    if name.startswith("hf-auto:"):
        model, x = Z.hf_auto_model(name[len("hf-auto:"):])
        return model, x
    if name.startswith("hf:"):
        model, kind = Z.hf_model(name[3:])
        return model.eval(), Z.hf_inputs(kind)
    import timm
    model = timm.create_model(name, pretrained=False).eval()
    return model, Z.timm_input(model)


def _forward(m, x):
    import torch
    out = m(**x) if isinstance(x, dict) else m(x)
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict) or hasattr(out, "values"):  # dicts and Hugging Face ModelOutputs
        out = next(iter(out.values()))
    elif isinstance(out, (tuple, list)):
        out = out[0]
    return out


def _secateur(name, _size, q):
    import torch
    torch.set_num_threads(1)
    from helpers import pruned_vs_reference
    from secateur.metrics import count_macs, count_params
    from secateur.structured import plan_channels
    model, x = _build(name)
    if x is None:
        q.put(dict(ok=False, error="does not run on CPU with random inputs (or not at the tiny size)"))
        return
    with torch.no_grad():  # zero-initialised heads would make the oracle vacuous (as in tests/test_zoo.py)
        for p in model.parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(std=0.02)
    macs0, params0 = count_macs(model, x), count_params(model)
    t0, c0 = time.perf_counter(), time.process_time()
    plan = plan_channels(model, x, ratio=0.5)
    t1, c1 = time.perf_counter(), time.process_time()
    _, want, got = pruned_vs_reference(model, x, plan, run=_forward)
    err = ((got - want).abs().max() / want.abs().max().clamp_min(1e-12)).item() if got.shape == want.shape \
        else float("inf")
    q.put(dict(ok=got.shape == want.shape and err < 1e-4, oracle_err=err, plan_s=t1 - t0, plan_cpu_s=c1 - c0,
               macs0=macs0, params0=params0, macs_frac=count_macs(model, x) / macs0, params_frac=count_params(model) / params0,
               groups=len(plan.choices), notes=len(plan.notes), first_notes=[n[:300] for n in plan.notes[:6]]))


def _peer(name, _size, q):
    import torch
    torch.set_num_threads(1)
    import torch_pruning as tp
    from secateur.metrics import count_macs
    model, x = _build(name)
    macs0 = count_macs(model, x)
    with torch.no_grad():
        shape = model(x).shape
    pruner = tp.pruner.MagnitudePruner(model, x, importance=tp.importance.MagnitudeImportance(p=2),
                                       pruning_ratio=0.5, ignored_layers=[_classifier(model)])
    pruner.step()
    with torch.no_grad():
        ok = model(x).shape == shape
    q.put(dict(ok=ok, macs_frac=count_macs(model, x) / macs0))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", help="timm names or hf:<family> (default: the tests' selection)")
    ap.add_argument("--timeout", type=float, default=120.0, help="per model and engine, seconds")
    ap.add_argument("--no-peer", action="store_true", help="skip Torch-Pruning")
    ap.add_argument("--hf-causal-lm", action="store_true", help="every causal LM type in transformers' registry at a "
                    "tiny random configuration (hf-auto:<type>; written to results/hf_causal_lm.json)")
    ap.add_argument("--moe", action="store_true", help="with --hf-causal-lm: only the mixture-of-experts types (their "
                    "config names an expert count; written to results/hf_causal_lm_moe.json)")
    ap.add_argument("--out", default=None, help="JSON path (default results/zoo_depth.json, or "
                    "results/zoo_depth_subset.json with --models, so a partial run never replaces the full one)")
    args = ap.parse_args(argv)
    if args.hf_causal_lm:
        import zoo_models as Z
        types = [t for t in Z.hf_causal_lm_types() if not args.moe or _is_moe(t)]
        args.models, args.no_peer = [f"hf-auto:{t}" for t in types], True
        args.out = args.out or os.path.join(ROOT, "results", "hf_causal_lm_moe.json" if args.moe else
                                            "hf_causal_lm.json")
    if args.out is None:
        args.out = os.path.join(ROOT, "results", "zoo_depth_subset.json" if args.models else "zoo_depth.json")
    import torch
    torch.set_num_threads(1)
    import zoo_models as Z
    import secateur.structured  # noqa: F401 - imported before forking
    if any(n.startswith("hf") for n in (args.models or ["hf"])):
        import transformers  # noqa: F401 - once, not in every child (seconds each)
        import transformers.models.auto.modeling_auto  # noqa: F401
    if not args.no_peer:
        import torch_pruning  # noqa: F401
    names = args.models or (Z.timm_one_per_module() + [f"hf:{f}" for f in Z.HF_FAMILIES])
    rows = []
    for i, name in enumerate(names):
        print(f"[{i + 1}/{len(names)}] {name}", flush=True)
        if name in Z.TIMM_GIANTS:
            rows.append(dict(model=name, skipped=Z.TIMM_GIANTS[name]))
            continue
        t = time.perf_counter()
        row = dict(model=name, secateur=run(_secateur, name, None, args.timeout))
        row["secateur"]["wall_s"] = time.perf_counter() - t
        if not args.no_peer and not name.startswith("hf"):
            row["torch_pruning"] = run(_peer, name, None, args.timeout)
        rows.append(row)
    _print(rows)
    fr = [r["secateur"]["macs_frac"] for r in rows if "macs_frac" in r.get("secateur", {})]
    timm_fr = [r["secateur"]["macs_frac"] for r in rows
               if "macs_frac" in r.get("secateur", {}) and not r["model"].startswith("hf")]
    summary = dict(models=len(rows), measured=len(fr), oracle_ok=sum(r.get("secateur", {}).get("ok", False) is True
                                                                     for r in rows),
                   timm_measured=len(timm_fr), timm_above_0_4=sum(f > DEEP for f in timm_fr),
                   not_run=sum(str(r.get("secateur", {}).get("error", "")).startswith("does not run") for r in rows),
                   above_0_4=sum(f > DEEP for f in fr))
    print("\nsummary:", json.dumps(summary))
    write_results(args.out, dict(ratio=0.5, timeout=args.timeout, command=" ".join(["python"] + sys.argv),
                                 summary=summary, rows=rows))


_EXPERT_COUNTS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def _is_moe(model_type: str) -> bool:
    """A registry type whose default config names a positive expert count (its own, its text config's, or DBRX's
    ``ffn_config``)."""
    from transformers import CONFIG_MAPPING
    try:
        cfg = CONFIG_MAPPING[model_type]()
    except Exception:  # noqa: BLE001 - a config that does not build with defaults is not run either
        return False
    cfgs = [cfg] + [getattr(cfg, k) for k in ("text_config", "ffn_config") if getattr(cfg, k, None) is not None]
    return any(isinstance(getattr(c, k, None), int) and getattr(c, k) > 0 for c in cfgs for k in _EXPERT_COUNTS)


def _print(rows):
    def key(r):
        return r.get("secateur", {}).get("macs_frac", 2.0)
    print(f"\n{'model':34} {'dense MMACs':>11} {'MACs':>6} {'params':>6} {'TP MACs':>7} {'plan s':>6} "
          f"{'oracle':>8} {'notes':>5}  first note")
    for r in sorted(rows, key=key):
        s, p = r.get("secateur", {}), r.get("torch_pruning", {})
        if "macs_frac" not in s:
            print(f"{r['model']:34} -- {r.get('skipped') or s.get('error', '?')[:100]}")
            continue
        tp = f"{p['macs_frac']:.3f}" if p.get("ok") and "macs_frac" in p else ("fail" if p else "-")
        note = (s["first_notes"] or [""])[0][:90]
        print(f"{r['model']:34} {s['macs0'] / 1e6:11.1f} {s['macs_frac']:6.3f} {s['params_frac']:6.3f} {tp:>7} "
              f"{s['plan_s']:6.1f} {s['oracle_err']:8.1e} {s['notes']:5d}  {note}")


if __name__ == "__main__":
    main()
