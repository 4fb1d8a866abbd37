"""torchvision's detection and video zoos through the structural engine (issue #3: "plus segmentation / detection
where inputs allow").

Per model, in its own subprocess with a timeout: ``plan_channels(model, x, ratio=0.5)``, apply, and the oracle
(pruned vs the original with the chosen channels zeroed at their consumers, norms over kept channels): for video
models on the output, for detectors on what their heads return (forward hooks on the RPN / box / mask / keypoint
predictors or the SSD / RetinaNet / FCOS heads, whose channels are the model's and stay) and on the detections
(random weights give few or none; with near-uniform random class scores, 1e-6 differences reorder SSD's
top-k, so "ok" is the heads' oracle for detectors and the detections' error is reported beside it). An R-CNN's second stage is given the reference's proposals: with random
weights many objectness scores are nearly equal, so a 1e-6 difference reorders top-k / NMS and the two models would
crop different boxes (the RPN head's own outputs are compared as they are); images are resized to 320 px inside the model (``min_size`` / ``max_size``;
the R-CNNs default to 800). Prints a table and writes benchmarks/results/detection_video.json.

    python benchmarks/bench_detection_video.py [--models ssd300_vgg16 r3d_18] [--timeout 300]
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
from bench_structural_zoo import run  # noqa: E402 - same subprocess-with-timeout runner

HEADS = ("rpn.head", "roi_heads.box_predictor", "roi_heads.mask_predictor", "roi_heads.keypoint_predictor",
         "head.classification_head", "head.regression_head")
VIDEO_INPUT = {"mvit_v1_b": (16, 224), "mvit_v2_s": (16, 224), "s3d": (16, 224)}  # (frames, size); default (8, 112)


def _err(a, b) -> float:
    from secateur.graph.capture import _flat_tensors
    fa, fb = _flat_tensors(a), _flat_tensors(b)
    if len(fa) != len(fb) or any(u.shape != v.shape for u, v in zip(fa, fb)):
        return float("inf")
    errs = [float((u.float() - v.float()).abs().max() / v.float().abs().max().clamp_min(1e-12)) for u, v in
            zip(fa, fb) if v.numel()]
    return max(errs, default=0.0)


def _secateur(name, _size, q):
    import copy
    import torch
    import torchvision as tv
    torch.set_num_threads(1)
    from secateur.metrics import count_params
    from secateur.structured import plan_channels
    torch.manual_seed(0)
    video = name in tv.models.list_models(module=tv.models.video)
    if video:
        frames, size = VIDEO_INPUT.get(name, (8, 112))
        m = tv.models.get_model(name).eval()
        x, run_ = torch.randn(1, 3, frames, size, size), (lambda mod, x: mod(x))
    else:
        small = {} if name.startswith("ssd") else {"min_size": 320, "max_size": 320}  # R-CNNs resize to 800 px
        m = tv.models.get_model(name, weights=None, weights_backbone=None, **small).eval()
        x, run_ = ([torch.rand(3, 160, 160)],), (lambda mod, x: mod(*x))
    hooks = [h for h in HEADS if not video and _has(m, h)]
    p0 = count_params(m)
    t0 = time.perf_counter()
    plan = plan_channels(m, x, ratio=0.5)
    t1 = time.perf_counter()
    ref = copy.deepcopy(m)
    plan.zero_consumers(ref)
    seen_ref, seen_got, proposals = [], [], []
    hr = [ref.get_submodule(h).register_forward_hook(lambda mod, a, o: seen_ref.append(o)) for h in hooks]
    if _has(ref, "rpn"):  # R-CNNs: the second stage gets the reference's proposals (see _same_proposals)
        hr.append(ref.get_submodule("rpn").register_forward_hook(lambda mod, a, o: proposals.append(o)))
    with torch.no_grad():
        with plan.kept_norms(ref):
            want = run_(ref, x)
        t2 = time.perf_counter()
        plan.apply(m)
        t3 = time.perf_counter()
        hg = [m.get_submodule(h).register_forward_hook(lambda mod, a, o: seen_got.append(o)) for h in hooks]
        if proposals:
            hg.append(m.get_submodule("rpn").register_forward_hook(lambda mod, a, o: proposals[0]))
        got = run_(m, x)
    for h in hr + hg:
        h.remove()
    head_err = _err(seen_ref, seen_got) if hooks else None
    out_err = _err(want, got)
    detections = None if video else sum(int(d["boxes"].shape[0]) for d in got)
    q.put(dict(kind="video" if video else "detection", plan_s=t1 - t0, apply_s=t3 - t2, params0=p0,
               params_frac=count_params(m) / p0, oracle_heads=head_err, oracle_out=out_err, detections=detections,
               ok=head_err < 1e-3 if hooks else out_err < 1e-3, groups=len(plan.choices),
               notes=len(plan.notes), first_notes=[n[:200] for n in plan.notes[:3]]))


def _has(m, name):
    try:
        m.get_submodule(name)
        return True
    except AttributeError:
        return False


def main(argv=None) -> None:
    import torchvision as tv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="*", help="torchvision detection / video model names (default: all)")
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--out", default=None, help="default results/detection_video.json (…_subset.json with --models)")
    args = ap.parse_args(argv)
    names = args.models or (tv.models.list_models(module=tv.models.detection)
                            + tv.models.list_models(module=tv.models.video))
    out = args.out or os.path.join(ROOT, "results", "detection_video_subset.json" if args.models
                                   else "detection_video.json")
    rows = []
    for i, name in enumerate(names):
        print(f"[{i + 1}/{len(names)}] {name}", flush=True)
        rows.append({"model": name, "secateur": run(_secateur, name, 0, args.timeout)})
    print(f"\n{'model':40s} {'kind':9s} {'params':>6s} {'plan s':>7s} {'heads err':>9s} {'out err':>8s} "
          f"{'dets':>4s}  first note")
    for r in rows:
        s = r["secateur"]
        if "params_frac" not in s:
            print(f"{r['model']:40s} FAILED {s.get('error', '')[:120]}")
            continue
        he = "-" if s["oracle_heads"] is None else f"{s['oracle_heads']:.1e}"
        print(f"{r['model']:40s} {s['kind']:9s} {s['params_frac']:6.3f} {s['plan_s']:7.1f} {he:>9s} "
              f"{s['oracle_out']:8.1e} {str(s['detections'] if s['detections'] is not None else '-'):>4s}  "
              f"{(s['first_notes'] or [''])[0][:90]}")
    ok = sum(1 for r in rows if r["secateur"].get("ok"))
    summary = {"models": len(rows), "oracle_ok": ok}
    print("\nsummary:", json.dumps(summary))
    write_results(out, dict(ratio=0.5, timeout=args.timeout, command=" ".join(["python"] + sys.argv),
                            summary=summary, rows=rows))


if __name__ == "__main__":
    main()
