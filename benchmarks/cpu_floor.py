"""CPU ratios of issue 10, each against a baseline timed in the same process.

Interleaved repeats on one thread; prints the load average and the CPU, then one line per
ratio (median of the per-round ratios, with the range). Run it from a checkout:

    PYTHONPATH=$PWD/src python benchmarks/cpu_floor.py [--rounds 5] [--reps 1] [--only NAME]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

import convnn
from convnn.functional import convnn_attention


def _time(fn, reps: int = 1) -> float:
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def _fwd_bwd(module, x):
    def step():
        module.zero_grad(set_to_none=True)
        x.grad = None
        module(x).sum().backward()

    return step


def case_local_attention():
    """ConvNN local attention (window 7x7 = K 49, softmax, kernel none) vs SDPA with the
    same window mask, forward+backward, ViT-Tiny shapes (B 16, 3 heads, 14x14, d 64)."""
    g = torch.Generator().manual_seed(0)
    B, G, H, d = 16, 3, 14, 64
    q, k, v = (torch.randn(B, G, H * H, d, generator=g, requires_grad=True) for _ in range(3))
    from convnn.stages.candidates import Grid

    win = Grid(H, H).window(7, "cpu")
    mask = torch.zeros(H * H, H * H, dtype=torch.bool)
    mask.scatter_(1, win, True)

    def ours():
        out = convnn_attention(q, k, v, K=49, candidates="window", window=7, hw=(H, H))
        out.sum().backward()

    def sdpa():
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out.sum().backward()

    return ours, sdpa


def case_vit_local():
    """ViT-Tiny training step (batch 32, 32x32 images, 10 classes): 'local' attention (a
    7x7 window of the 8x8 token map, K = 49) vs plain attention."""
    from convnn.models.registry import create_model

    torch.manual_seed(0)
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    models = [
        create_model("vit_tiny", num_classes=10, img_size=32, layer=k)
        for k in ("local", "attention")
    ]

    def step(model):
        def f():
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()

        return f

    return step(models[0]), step(models[1])


def case_compile():
    """torch.compile(ConvNN2d(64, 64, K=9, cosine, all)) vs eager, forward+backward, 2x64x32x32."""
    torch.manual_seed(0)
    layer = convnn.ConvNN2d(64, 64, K=9)
    x = torch.randn(2, 64, 32, 32, requires_grad=True)
    compiled = torch.compile(layer)
    step_c, step_e = _fwd_bwd(compiled, x), _fwd_bwd(layer, x)
    step_c()  # compile outside the timing
    return step_c, step_e


def case_bf16_selection():
    """ConvNN2d(64, 64, K=9, cosine, all) forward with bf16 vs fp32 selection, 4x64x32x32."""
    torch.manual_seed(0)
    x = torch.randn(4, 64, 32, 32)
    l32 = convnn.ConvNN2d(64, 64, K=9)
    l16 = convnn.ConvNN2d(64, 64, K=9, selection_dtype=torch.bfloat16)
    l16.load_state_dict(l32.state_dict())
    with torch.no_grad():
        i32 = l32(x, return_indices=True)[1] if _has_indices(l32) else None
        i16 = l16(x, return_indices=True)[1] if i32 is not None else None
    if i32 is not None:
        hit = (i16[..., None] == i32[..., None, :]).any(-1).float().mean().item()
        print(f"  bf16 selection recall vs fp32: {hit:.4f}")

    def run(layer):
        def f():
            with torch.no_grad():
                layer(x)

        return f

    return run(l16), run(l32)


def case_bf16_tail():
    """The selection tail alone (top-K with the tie rule) on bf16 vs fp32 cosine scores of
    4 x 1024 queries against 1024 keys, K = 8: bf16 rounding makes many rows tie at the
    K-th score, which the tail repairs (the bf16 GEMM itself is left out: on a CPU without
    AVX-512-BF16 it alone is ~10x the fp32 GEMM)."""
    from convnn.backends._common import topk_low_ties

    torch.manual_seed(0)
    f = F.normalize(torch.randn(4, 1024, 64), dim=-1)
    s32 = f @ f.transpose(-1, -2)
    s16 = s32.bfloat16()
    ties = (s16.topk(9, dim=-1).values[..., 7] == s16.topk(9, dim=-1).values[..., 8]).float()
    print(f"  bf16 rows tied at the K-th score: {ties.mean().item():.3f}")
    return (lambda: topk_low_ties(s16, 8)), (lambda: topk_low_ties(s32, 8))


def _has_indices(layer) -> bool:
    import inspect

    return "return_indices" in inspect.signature(layer.forward).parameters


def case_window_vs_all():
    """ConvNN2d window 7x7 K=9 vs all K=9 (cosine), forward+backward, 2x64x64x64."""
    torch.manual_seed(0)
    x = torch.randn(2, 64, 64, 64, requires_grad=True)
    win = convnn.ConvNN2d(64, 64, K=9, candidates="window", window=7)
    full = convnn.ConvNN2d(64, 64, K=9)
    return _fwd_bwd(win, x), _fwd_bwd(full, x)


def case_window_vs_conv():
    """ConvNN2d window 7x7 K=9 vs nn.Conv2d 3x3, forward+backward, 8x64x32x32."""
    torch.manual_seed(0)
    x = torch.randn(8, 64, 32, 32, requires_grad=True)
    win = convnn.ConvNN2d(64, 64, K=9, candidates="window", window=7)
    conv = torch.nn.Conv2d(64, 64, 3, padding=1)
    return _fwd_bwd(win, x), _fwd_bwd(conv, x)


def case_selection_all():
    """Selection alone (cosine, all, K=9) on 8x4096 tokens of 64 channels vs its score GEMM."""
    from convnn.backends import chunked

    torch.manual_seed(0)
    q = F.normalize(torch.randn(8, 4096, 64), dim=-1)

    def ours():
        chunked.select(q, q, 9)

    def gemm():
        q @ q.transpose(-1, -2)

    return ours, gemm


CASES = {
    "local_attention/sdpa_masked": case_local_attention,
    "vit_tiny_local/attention": case_vit_local,
    "compiled/eager": case_compile,
    "bf16_selection/fp32_selection": case_bf16_selection,
    "bf16_tail/fp32_tail": case_bf16_tail,
    "window7x7/all": case_window_vs_all,
    "window7x7/conv3x3": case_window_vs_conv,
    "selection_all/score_gemm": case_selection_all,
}


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        return f"{names[0]} x {len(names)}"
    except OSError:
        return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reps", type=int, default=1, help="calls timed together per round")
    parser.add_argument("--only", default="")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread, {_cpu()}")
    print(f"load average at start: {os.getloadavg()}")
    for name, make in CASES.items():
        if args.only not in name:
            continue
        ours, base = make()
        ours(), base()  # warm-up
        ratios, t_ours, t_base = [], [], []
        for _ in range(args.rounds):
            a, b = _time(ours, args.reps), _time(base, args.reps)
            t_ours.append(a), t_base.append(b)
            ratios.append(a / b)
        print(
            f"{name:34s} ratio {statistics.median(ratios):6.2f} "
            f"(range {min(ratios):.2f}-{max(ratios):.2f}; "
            f"ours {statistics.median(t_ours) * 1e3:.1f} ms, "
            f"baseline {statistics.median(t_base) * 1e3:.1f} ms)"
        )
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
