"""Structural pruning on the torchvision classification zoo: secateur vs Torch-Pruning 1.6.1, in one run.

Per model (each engine in its own subprocess, with a timeout, since the peer hangs on Swin/MaxViT): capture (graph)
time, prune time, peak RSS, success (pruned model runs, output shape kept), oracle error (secateur: removal vs
zeroing the chosen channels at their consumers, norms over pruned channels computed over the kept ones), MACs and params after. Both: 50 %, magnitude importance,
default settings, the final classifier's outputs kept. Also plans a LLaMA-style 7B configuration on the meta
device (no weights allocated).

    python benchmarks/bench_structural_zoo.py [--models resnet18 swin_t] [--timeout 300] [--size 224]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.abspath(__file__))
GIANTS = {"vit_h_14", "regnet_y_128gf"}  # > 600M params: building them alone takes minutes on 2 cores


def _classifier(model):
    import torch.nn as nn
    last = None
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            last = m
    return last


def _secateur(name, size, q):
    import copy
    import torch
    import torchvision
    torch.set_num_threads(1)
    from secateur.graph import build_graph
    from secateur.metrics import count_macs, count_params
    from secateur.structured import plan_channels
    model = torchvision.models.get_model(name).eval()
    with torch.no_grad():  # zero-initialised heads (ViT) would make the oracle error 0/0
        for p in model.parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(std=0.02)
    x = torch.randn(1, 3, size, size)
    t0 = time.perf_counter()
    graph = build_graph(model, x)
    t1 = time.perf_counter()
    plan = plan_channels(model, x, ratio=0.5, graph=graph)
    ref = copy.deepcopy(model)
    t2 = time.perf_counter()
    plan.apply(model)
    t3 = time.perf_counter()
    plan.zero_consumers(ref)
    with torch.no_grad():
        with plan.kept_norms(ref):  # norms over pruned channels: the reference normalises over the kept ones
            want = ref(x)
        got = model(x)
    err = ((got - want).abs().max() / want.abs().max()).item()
    q.put(dict(capture_s=t1 - t0, prune_s=(t2 - t1) + (t3 - t2), ok=got.shape == want.shape, oracle_err=err,
               macs=count_macs(model, x), params=count_params(model), groups=len(plan.choices)))


def _peer(name, size, q):
    import torch
    import torchvision
    torch.set_num_threads(1)
    import torch_pruning as tp
    from secateur.metrics import count_macs, count_params
    model = torchvision.models.get_model(name).eval()
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        shape = model(x).shape
    t0, c0 = time.perf_counter(), time.process_time()
    pruner = tp.pruner.MagnitudePruner(model, x, importance=tp.importance.MagnitudeImportance(p=2),
                                       pruning_ratio=0.5, ignored_layers=[_classifier(model)])
    t1, c1 = time.perf_counter(), time.process_time()
    pruner.step()
    t2, c2 = time.perf_counter(), time.process_time()
    with torch.no_grad():
        ok = model(x).shape == shape
    q.put(dict(capture_s=t1 - t0, prune_s=t2 - t1, capture_cpu_s=c1 - c0, prune_cpu_s=c2 - c1, ok=ok,
               oracle_err=None, macs=count_macs(model, x), params=count_params(model)))


def _child(fn, name, size, q):
    try:
        fn(name, size, q)
    except BaseException as e:  # noqa: BLE001 - reported per model
        q.put(dict(ok=False, error=f"{type(e).__name__}: {str(e)[:200]}", trace=traceback.format_exc()[-600:]))
    q.put(dict(peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))


def run(fn, name, size, timeout):
    ctx = mp.get_context("fork")  # torch, torchvision and both engines are imported once, in the parent
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(fn, name, size, q))
    t = time.perf_counter()
    p.start()
    out = {}
    while True:
        try:
            out.update(q.get(timeout=max(0.1, timeout - (time.perf_counter() - t))))
            if "peak_rss_mb" in out:
                break
        except Exception:  # noqa: BLE001 - queue.Empty: timed out
            p.kill()
            out.update(ok=False, error=f"timeout after {timeout}s")
            break
    p.join(5)
    return out


def llama7b_on_meta():
    import torch
    import transformers as T
    from secateur.graph import build_graph
    from secateur.structured import plan_channels
    cfg = T.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                        num_key_value_heads=32, vocab_size=32000)
    with torch.device("meta"):
        model = T.LlamaForCausalLM(cfg).eval()
    x = {"input_ids": torch.zeros(1, 8, dtype=torch.long, device="meta")}
    t0 = time.perf_counter()
    graph = build_graph(model, x)
    t1 = time.perf_counter()
    plan = plan_channels(model, x, ratio=0.5, importance="random", graph=graph)
    t2 = time.perf_counter()
    return dict(params=sum(p.numel() for p in model.parameters()), capture_s=t1 - t0, plan_s=t2 - t1,
                groups=len(graph.groups), groups_planned=len(plan.choices), channels=plan.channels,
                peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", help="torchvision model names (default: the classification zoo)")
    ap.add_argument("--timeout", type=float, default=300.0, help="per model and engine, seconds")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--no-peer", action="store_true", help="skip Torch-Pruning")
    ap.add_argument("--out", default=os.path.join(ROOT, "results", "structural_zoo.json"))
    args = ap.parse_args(argv)
    sys.path.insert(0, os.path.join(ROOT, "..", "src"))
    import torch
    import torchvision
    torch.set_num_threads(1)
    import secateur.structured  # noqa: F401 - imported before forking
    if not args.no_peer:
        import torch_pruning  # noqa: F401
    names = args.models or [n for n in torchvision.models.list_models(module=torchvision.models)]
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    rows = []
    it = tqdm(names, desc="zoo") if tqdm else names
    for i, name in enumerate(it):
        if tqdm is None:
            print(f"[{i + 1}/{len(names)}] {name}", flush=True)
        if name in GIANTS:
            rows.append(dict(model=name, skipped="giant (>600M params)"))
            continue
        row = dict(model=name, secateur=run(_secateur, name, args.size, args.timeout))
        if not args.no_peer:
            row["torch_pruning"] = run(_peer, name, args.size, args.timeout)
        rows.append(row)
        _write(args, rows, None, partial=True)  # a long run keeps what it measured
    print(f"\n{'model':24} {'sec cap':>8} {'sec prune':>9} {'sec err':>8} {'sec MB':>7} {'TP cap':>8} "
          f"{'TP prune':>8} {'TP ok':>6} {'MACs sec/TP (M)':>18} {'params sec/TP (M)':>18}")
    for r in rows:
        if "skipped" in r:
            print(f"{r['model']:24} skipped: {r['skipped']}")
            continue
        s, p = r["secateur"], r.get("torch_pruning", {})

        def f(d, k, fmt):
            v = d.get(k)
            return format(v, fmt) if isinstance(v, (int, float)) and v is not None else "-"
        print(f"{r['model']:24} {f(s, 'capture_s', '8.2f')} {f(s, 'prune_s', '9.2f')} "
              f"{f(s, 'oracle_err', '8.1e')} {f(s, 'peak_rss_mb', '7.0f')} {f(p, 'capture_s', '8.2f')} "
              f"{f(p, 'prune_s', '8.2f')} {str(p.get('ok', '-')):>6} "
              f"{f(s, 'macs', '.0f')[:-6] or '-':>8}/{f(p, 'macs', '.0f')[:-6] or '-':<9} "
              f"{f(s, 'params', '.0f')[:-6] or '-':>8}/{f(p, 'params', '.0f')[:-6] or '-':<9}"
              + (f"  sec: {s['error']}" if s.get("error") else "") + (f"  TP: {p['error'][:60]}" if p.get("error")
                                                                     else ""))
    meta = None
    try:
        meta = llama7b_on_meta()
        print(f"\nLLaMA-style 7B on meta: {meta['params'] / 1e9:.2f}B params, capture {meta['capture_s']:.2f}s, "
              f"plan {meta['plan_s']:.2f}s, {meta['groups']} groups, RSS {meta['peak_rss_mb']:.0f} MB")
    except Exception as e:  # noqa: BLE001
        meta = dict(error=f"{type(e).__name__}: {e}")
        print("LLaMA 7B meta plan failed:", meta["error"])
    ok = [r for r in rows if "secateur" in r and r["secateur"].get("ok")]
    tp_ok = [r for r in rows if r.get("torch_pruning", {}).get("ok")]
    summary = dict(models=len(rows), secateur_ok=len(ok), torch_pruning_ok=len(tp_ok),
                   secateur_max_total_s=max((r["secateur"]["capture_s"] + r["secateur"]["prune_s"] for r in ok),
                                            default=None),
                   secateur_max_oracle_err=max((r["secateur"]["oracle_err"] for r in ok), default=None))
    print("\nsummary:", json.dumps(summary))
    _write(args, rows, meta, summary=summary)


def _write(args, rows, meta, partial=False, summary=None):
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(dict(size=args.size, timeout=args.timeout, partial=partial, summary=summary,
                       llama7b_meta=meta, rows=rows), fh, indent=1, default=str)


if __name__ == "__main__":
    main()
