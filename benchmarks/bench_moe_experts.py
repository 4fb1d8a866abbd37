"""Per-expert channel sets vs one set shared by all experts, on transformers' fused-experts MoE models (issue #3).

Per model type (tiny random configs, tests/zoo_models.py), ratio 0.5, L1: the default plan (each expert keeps its
own top intermediate channels) and the same plan with every experts group's choice replaced by one shared set (the
channels of lowest importance summed over the experts, what secateur did before). For both: the oracle error
(pruned model vs the original with the chosen channels zeroed at their consumers), MACs after / dense, and the
importance retained: the sum of every expert's own scores over the channels it keeps, over the sum of all of them
(experts groups only). Three weight settings: the random init; "scaled": each expert's weights scaled by one
log-normal factor of its own (sigma 1); "differ": each expert's channels scaled by their own log-normal factors
(sigma 1, gate/up rows and down columns together), as experts trained apart would differ.
Also checks save / load of the per-expert model (bit-exact). Writes benchmarks/results/moe_experts.json.

    python benchmarks/bench_moe_experts.py [--types mixtral qwen2_moe ...]
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(ROOT, "..", "src"), os.path.join(ROOT, "..", "tests"), ROOT]

import torch  # noqa: E402

from _results import write_results  # noqa: E402

TYPES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss", "phimoe"]


def _differ(model: torch.nn.Module, per_channel: bool = True) -> None:
    """Scale each expert's intermediate channels by factors of its own (experts of a trained model differ); with
    ``per_channel`` False, one factor per expert (its whole weights)."""
    from secateur.graph.moe import Layout, _is_candidate, layout
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for mod in model.modules():
            lay = layout(mod) if _is_candidate(mod) else None
            if not isinstance(lay, Layout):
                continue
            f = torch.exp(torch.randn(lay.experts, lay.inter if per_channel else 1, generator=g))
            f = f.expand(lay.experts, lay.inter)
            rows = f if lay.pairs == 1 else f.repeat_interleave(2, 1) if lay.interleaved else torch.cat([f, f], 1)
            up = getattr(mod, lay.up)
            up.mul_(rows.reshape([lay.experts] + [-1 if d == lay.up_rows else 1 for d in (1, 2)]))
            mod.down_proj.mul_(f.reshape([lay.experts] + [-1 if d == lay.down_inter else 1 for d in (1, 2)]))


def _one(model_type: str, weights: str) -> dict:
    import zoo_models as Z
    import secateur
    from helpers import pruned_vs_reference
    from secateur.importance import expert_scores, group_scores
    from secateur.metrics import count_macs
    from secateur.structured import plan_channels
    from secateur.structured.plan import Plan
    torch.manual_seed(0)
    model, x = Z.hf_auto_model(model_type)
    if model is None:
        return {"type": model_type, "error": "does not build"}
    if weights != "random":
        _differ(model, per_channel=weights == "differ")
    run = lambda m, x: m(**x).logits  # noqa: E731
    macs0 = count_macs(model, x)
    plan = plan_channels(model, x, ratio=0.5)
    experts = [(g, c) for g, c in plan.choices if g.experts]
    kept = {"per_expert": 0.0, "shared": 0.0}
    total = 0.0
    shared_choices = []
    for g, c in plan.choices:
        if not g.experts:
            shared_choices.append((g, c))
            continue
        own = expert_scores(g, model).own
        sc = torch.argsort(group_scores(g, model), stable=True)[:c.size(1)].sort().values
        shared_choices.append((g, sc))
        total += float(own.sum())
        kept["per_expert"] += float(own.sum() - own.gather(1, c).sum())
        kept["shared"] += float(own.sum() - own[:, sc].sum())
    shared = Plan(plan.groups, shared_choices, list(plan.notes), heads=plan.heads, norms=plan.norms,
                  attrs=plan.attrs)
    row = {"type": model_type, "weights": weights, "experts_groups": len(experts),
           "experts_notes": [n for n in plan.notes if "experts" in n]}
    twin = copy.deepcopy(model)
    for name, p, m in (("per_expert", plan, model), ("shared", shared, twin)):
        _, want, got = pruned_vs_reference(m, x, p, run)
        row[name] = {"oracle": float((want - got).abs().max()), "macs": count_macs(m, x) / macs0,
                     "importance_kept": kept[name] / total if total else None}
    with tempfile.TemporaryDirectory() as d:
        secateur.save(model, os.path.join(d, "m.safetensors"))
        torch.manual_seed(0)
        fresh, _ = Z.hf_auto_model(model_type)
        fresh = secateur.load(fresh, os.path.join(d, "m.safetensors"))
        with torch.no_grad():
            row["reload_max_diff"] = float((run(fresh, x) - run(model, x)).abs().max())
    return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", nargs="*", default=TYPES)
    ap.add_argument("--out", default=os.path.join(ROOT, "results", "moe_experts.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    print(f"{'type':12} {'weights':7} {'oracle own/shared':>21} {'MACs own/shared':>17} {'kept imp. own/shared':>22} "
          f"{'reload':>7}")
    for t in args.types:
        for weights in ("random", "scaled", "differ"):
            r = _one(t, weights)
            rows.append(r)
            if "error" in r:
                print(f"{t:12} {r['error']}")
                continue
            a, b = r["per_expert"], r["shared"]
            imp = (f"{a['importance_kept']:.4f} / {b['importance_kept']:.4f}" if a["importance_kept"] is not None
                   else "-")
            print(f"{t:12} {r['weights']:7} {a['oracle']:9.2e} / {b['oracle']:9.2e} {a['macs']:7.3f} / "
                  f"{b['macs']:7.3f} {imp:>22} {r['reload_max_diff']:7.1e}")
    write_results(args.out, {"command": "python benchmarks/bench_moe_experts.py", "ratio": 0.5,
                             "importance": "l1", "rows": rows})


if __name__ == "__main__":
    main()
