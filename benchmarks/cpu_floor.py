"""CPU ratios of issue 10, each against its baseline(s) timed in the same process, interleaved.

Each group builds its implementations once, warms each up, then runs ``--rounds`` rounds: in
every round each implementation takes one timed call (``--reps`` calls timed together), in
an order rotated by one each round (:func:`convnn.bench.rounds.interleave`). A ratio is the
median of its per-round ratios, with their range; one that rests on fewer than 3 rounds or
spreads by more than 2x (max / min) is printed as ``noisy: lo-hi`` and judged against no bar.
The thread count is fixed (``--threads``, default 1) and the 1-min load average is printed
before and after each group. The last lines are a Markdown table of every ratio with its bar.

    PYTHONPATH=$PWD/src python benchmarks/cpu_floor.py --rounds 5            # every ratio
    PYTHONPATH=$PWD/src python benchmarks/cpu_floor.py --only headline       # groups/ratios whose name contains it
    PYTHONPATH=$PWD/src python benchmarks/cpu_floor.py --list                # the groups and their ratios
    PYTHONPATH=$PWD/src python benchmarks/cpu_floor.py --quick --rounds 3    # tiny shapes: a smoke test, seconds

``--only`` matches a group name (``headline``, ``vit_tiny``, ``resnet18``, ...) or a ratio
name (``window7x7/conv3x3``); a group runs whole when any of its ratios is selected.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import convnn
from convnn import backends, native
from convnn.bench.cases import Case
from convnn.bench.measurement import build_case
from convnn.bench.rounds import format_ratio, interleave, ratio_stats
from convnn.functional import convnn_attention


@dataclass
class Ratio:
    """``name`` = runner ``ours`` / runner ``base``, round by round; met when the median is
    <= ``bar``. With ``ours_ref`` and ``base_ref`` it is a ratio of ratios: (ours / ours_ref)
    / (base / base_ref), each inner ratio taken in the same round (e.g. slowdowns)."""

    name: str
    ours: str
    base: str
    bar: float | None = None
    ours_ref: str | None = None
    base_ref: str | None = None


@dataclass
class Group:
    """Implementations (name -> callable) timed round by round together; the ratios taken
    between them are declared in :data:`RATIOS`."""

    name: str
    runners: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # runner name -> context manager factory entered around its timed call (untimed)
    around: dict = field(default_factory=dict)
    # calls timed together per round, and rounds, at least (``--reps`` and ``--rounds`` may
    # ask for more): a step of ~10 ms timed alone is decided by one preemption of a busy VM,
    # and a ratio near 1 needs more rounds than a few seconds' steps to settle
    reps: int = 1
    rounds: int = 1


def _time(fn, reps: int = 1) -> float:
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def _fwd_bwd(module, x, grad):
    """A training step's forward and backward, with an output gradient as a network's loss
    hands a layer (``sum().backward()`` would hand a broadcast scalar, which an eager
    backward reads as it is but a compiled one first writes out whole)."""

    def step():
        module.zero_grad(set_to_none=True)
        x.grad = None
        module(x).backward(grad)

    return step


def _case_step(case: Case):
    """A training step of a ``convnn bench`` case (fixed seeds, output gradient), under the
    case's backend: ``reference`` is the dense formulation."""
    module, x, grad = build_case(case, "cpu", torch.float32)
    params = list(module.parameters())

    def step():
        for t in (x, *params):
            t.grad = None
        with backends.use(case.backend):
            module(x).backward(grad)

    return step


def gemm_floor(B: int, C: int, N: int, K: int, C_out: int):
    """The headline step's GEMMs alone, at its shapes, in fp32:

    - the similarity GEMM, (N, C) x (C, N) per image (B of them, one at a time as the
      chunked backend never holds all B score matrices; N x N fp32 each);
    - the three aggregation GEMMs of the standard kernel: forward (B*N, K*C) x (K*C, C_out),
      input gradient (B*N, C_out) x (C_out, K*C), weight gradient (K*C, B*N) x (B*N, C_out).

    Nothing else: no normalisation, top-K, gather or scatter, and no allocation: the products
    write into buffers made once, so the floor pays no page faults for its outputs (N x N
    fp32 per image is 64 MiB at N = 4096, which glibc maps afresh on every call: the floor
    took ~1.8x its compute time that way). Ratio 1 = the step costs exactly its matrix
    products.
    """
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(B, N, C, generator=g)
    gathered = torch.randn(B * N, K * C, generator=g)
    weight = torch.randn(K * C, C_out, generator=g)
    grad_out = torch.randn(B * N, C_out, generator=g)
    sim = torch.empty(N, N)
    out, g_in, g_w = torch.empty(B * N, C_out), torch.empty(B * N, K * C), torch.empty_like(weight)

    def floor():
        for b in range(B):
            torch.mm(feats[b], feats[b].T, out=sim)
        torch.mm(gathered, weight, out=out)
        torch.mm(grad_out, weight.T, out=g_in)
        torch.mm(gathered.T, grad_out, out=g_w)

    return floor


def group_headline(quick: bool) -> Group:
    """ConvNN2d(64, 64, K=9, cosine, all) fwd+bwd on 8x64x64x64 against the dense formulation,
    its GEMM floor and the 7x7 window (K=9) at the same size."""
    B, C, S = (2, 8, 8) if quick else (8, 64, 64)
    shape = (B, C, S, S)
    tag = f"{B}x{C}x{S}x{S}"
    opts = dict(K=9, metric="cosine", candidates="all")
    win = dict(opts, candidates="window", window=7)
    g = Group(f"headline {tag}")
    g.runners = {
        "all": _case_step(Case(g.name, "all", "ours", "convnn2d", shape, opts)),
        "dense": _case_step(Case(g.name, "all", "dense", "convnn2d", shape, opts, "reference")),
        "gemm_floor": gemm_floor(B, C, S * S, 9, C),
        "window": _case_step(Case(g.name, "window", "ours", "convnn2d", shape, win)),
    }
    return g


def group_window_conv(quick: bool) -> Group:
    """ConvNN2d window 7x7 K=9 vs nn.Conv2d 3x3, forward+backward, 8x64x32x32."""
    shape = (2, 8, 8, 8) if quick else (8, 64, 32, 32)
    tag = "x".join(map(str, shape))
    g = Group(f"window_conv {tag}")
    win = dict(K=9, metric="cosine", candidates="window", window=7)
    g.runners = {
        "window": _case_step(Case(g.name, "window", "ours", "convnn2d", shape, win)),
        "conv3x3": _case_step(Case(g.name, "", "conv", "conv2d", shape)),
    }
    return g


def _local_attention(B: int, H: int, G: int, d: int) -> dict:
    """ConvNN local attention (window 7x7 = K 49, softmax, kernel none) and SDPA with the
    same window mask, forward+backward on B x H x H tokens. Both take q, k, v as timm's
    Attention makes them (views of one projection, its gradient the step's) and give the
    layer's output, heads merged to (B, N, C) as timm merges them."""
    from convnn.stages.candidates import Grid, window_mask

    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(B, H * H, 3 * G * d, generator=gen, requires_grad=True)
    mask = window_mask(Grid(H, H), 7, "cpu")

    def heads():
        return qkv.reshape(B, H * H, 3, G, d).permute(2, 0, 3, 1, 4).unbind(0)

    def ours():
        out = convnn_attention(*heads(), K=49, candidates="window", window=7, hw=(H, H))
        out.sum().backward()

    def sdpa():
        out = F.scaled_dot_product_attention(*heads(), attn_mask=mask)
        out.transpose(1, 2).reshape(B, H * H, G * d).sum().backward()

    return dict(local=ours, sdpa_masked=sdpa)


def group_local_attention(quick: bool) -> Group:
    """Local attention vs masked SDPA (:func:`_local_attention`) at ViT-Tiny shapes (B 16,
    3 heads, 14x14, d 64)."""
    B, G, H, d = (2, 1, 8, 8) if quick else (16, 3, 14, 64)
    return Group(f"local_attention B{B}x{G}x{H}x{H}x{d}", _local_attention(B, H, G, d))


def group_local_attention_map(quick: bool) -> Group:
    """Local attention vs masked SDPA (:func:`_local_attention`) on a map whose 7x7 window
    is a smaller share of it (B 1, 3 heads, 56x56, d 64: a hierarchical model's first
    stage). A group of its own: its large steps would disturb the ViT-Tiny timings."""
    B, G, H, d = (1, 1, 12, 8) if quick else (1, 3, 56, 64)
    return Group(f"local_attention_map B{B}x{G}x{H}x{H}x{d}", _local_attention(B, H, G, d))


def _train_step(model, x, y):
    def step():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    return step


def group_vit_tiny(quick: bool) -> Group:
    """ViT-Tiny training step (batch 32, 32x32 images in patches of 4: an 8x8 token map, 10
    classes): 'local' attention (a 7x7 window, K = 49) and 'kvt' (top-K attention, K = 9 of
    the 65 tokens) vs plain attention. (Patches of 16 would leave 2x2 tokens, where both are
    plain attention over every token.)"""
    from convnn.models.registry import create_model

    B = 2 if quick else 32
    extra = dict(depth=1) if quick else {}
    torch.manual_seed(0)
    x, y = torch.randn(B, 3, 32, 32), torch.randint(0, 10, (B,))
    g = Group(f"vit_tiny batch {B} 32x32 patch 4" + (" depth 1" if quick else ""))
    for layer in ("local", "kvt", "attention"):
        torch.manual_seed(0)
        model = create_model(
            "vit_tiny", num_classes=10, img_size=32, patch_size=4, layer=layer, **extra
        )
        g.runners[layer] = _train_step(model.train(), x, y)
    return g


def group_resnet18(quick: bool) -> Group:
    """ResNet-18 training step (batch 32, 32x32 images, 10 classes): 'branching' vs 'conv'."""
    from convnn.models.registry import create_model

    B = 2 if quick else 32
    torch.manual_seed(0)
    x, y = torch.randn(B, 3, 32, 32), torch.randint(0, 10, (B,))
    g = Group(f"resnet18 batch {B} 32x32")
    for layer in ("branching", "conv"):
        torch.manual_seed(0)
        model = create_model("resnet18", num_classes=10, img_size=32, layer=layer)
        g.runners[layer] = _train_step(model.train(), x, y)
    return g


def group_compile(quick: bool) -> Group:
    """torch.compile(ConvNN2d(64, 64, K=9, cosine, all)) vs eager, forward+backward with a
    random output gradient, 2x64x32x32, five steps timed together a round, 21 rounds at
    least (--quick: 1x8x8x8 with torch.compile's 'eager' backend, which only traces)."""
    torch.manual_seed(0)
    C, S = (8, 8) if quick else (64, 32)
    layer = convnn.ConvNN2d(C, C, K=9)
    x = torch.randn(1 if quick else 2, C, S, S, requires_grad=True)
    grad = torch.randn_like(x)  # the output's shape: C in = C out, stride 1, padding 'same'
    compiled = torch.compile(layer, backend="eager") if quick else torch.compile(layer)
    step_c, step_e = _fwd_bwd(compiled, x, grad), _fwd_bwd(layer, x, grad)
    step_c()  # compile outside the timing
    return Group(
        f"compile {tuple(x.shape)}",
        dict(compiled=step_c, eager=step_e),
        reps=5,
        rounds=1 if quick else 21,
    )


def group_bf16(quick: bool) -> Group:
    """ConvNN2d(64, 64, K=9, cosine, all) forward with bf16 vs fp32 selection, 4x64x32x32;
    and the selection tail alone (top-K with the tie rule) on bf16 vs fp32 cosine scores of
    4 x 1024 queries against 1024 keys, K = 8: bf16 rounding makes many rows tie at the K-th
    score, which the tail repairs. The bf16 tail is the layer's: on a CPU without bf16
    matrix instructions the scores come from an fp32 GEMM, ranked as their bf16 rounding
    (``rounding``), else from the bf16 GEMM."""
    from convnn.backends._common import topk_low_ties
    from convnn.metrics import _native_half_gemm

    torch.manual_seed(0)
    B, C, S, N = (1, 8, 8, 64) if quick else (4, 64, 32, 1024)
    x = torch.randn(B, C, S, S)
    l32 = convnn.ConvNN2d(C, C, K=9)
    l16 = convnn.ConvNN2d(C, C, K=9, selection_dtype=torch.bfloat16)
    l16.load_state_dict(l32.state_dict())
    f = F.normalize(torch.randn(B, N, 64), dim=-1)
    s32 = f @ f.transpose(-1, -2)
    s16 = s32.bfloat16()
    top = s16.topk(9, dim=-1).values
    ties = (top[..., 7] == top[..., 8]).float().mean().item()

    def forward(layer):
        def f():
            with torch.no_grad():
                layer(x)

        return f

    g = Group(f"bf16 {B}x{C}x{S}x{S}, tail {B}x{N}x{N}")
    g.runners = dict(
        bf16_selection=forward(l16),
        fp32_selection=forward(l32),
        bf16_tail=(
            (lambda: topk_low_ties(s16, 8))
            if _native_half_gemm(torch.bfloat16)
            else (lambda: topk_low_ties(s32, 8, rounding=torch.bfloat16))
        ),
        fp32_tail=lambda: topk_low_ties(s32, 8),
    )
    g.notes.append(f"bf16 rows tied at the K-th score: {ties:.3f}")
    return g


def group_selection(quick: bool) -> Group:
    """Selection alone (cosine, all, K=9) on 8x4096 tokens of 64 channels vs its score GEMM."""
    from convnn.backends import chunked

    torch.manual_seed(0)
    B, N = (1, 64) if quick else (8, 4096)
    q = F.normalize(torch.randn(B, N, 64), dim=-1)
    g = Group(f"selection {B}x{N}x64")
    g.runners = dict(select=lambda: chunked.select(q, q, 9), gemm=lambda: q @ q.transpose(-1, -2))
    return g


@contextlib.contextmanager
def _threads(n: int, busy: bool):
    """``n`` torch threads, and with ``busy`` a competing process spinning on one core
    (started and given a moment to be scheduled before the timed call, killed after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    spinner = None
    if busy:
        # it spins only while this process lives: killed from outside (a timeout), this
        # process cannot kill it, and an orphan would load the machine for good
        spin = f"import os\nwhile os.getppid() == {os.getpid()}:\n    for _ in range(10**6): pass"
        spinner = subprocess.Popen(
            [sys.executable, "-c", spin], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        time.sleep(0.2)
    try:
        yield spinner
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()
        torch.set_num_threads(before)


def group_load(quick: bool) -> Group:
    """Robustness under load: the headline ConvNN2d step (K=9, cosine, all, fwd+bwd, 8x64x64x64)
    and an nn.Conv2d 3x3 step of about the same FLOPs (its channel count chosen to match), each
    at 1 and 2 threads, on the machine as it is ('quiet') and with a competing process spinning
    on one core ('busy'), all interleaved. Slowdown = busy / quiet of the same round; the ratio
    of the slowdowns says whether a loaded machine hurts ConvNN more than a convolution. The
    same for 2 threads / 1 thread, quiet: what a second thread does on a shared machine."""
    B, C, S = (2, 8, 8) if quick else (8, 64, 64)
    N, K = S * S, 9
    # similarity GEMM (2 N^2 C per image) + aggregation fwd, input grad, weight grad (2 N K C C each)
    flops = B * (2 * N * N * C + 3 * 2 * N * K * C * C)
    C_conv = max(1, round((flops / (3 * 2 * B * N * 9)) ** 0.5))  # conv fwd+bwd: 3 GEMMs
    shape = (B, C, S, S)
    conv_shape = (B, C_conv, S, S)
    opts = dict(K=K, metric="cosine", candidates="all")
    g = Group(f"load {B}x{C}x{S}x{S}; conv {B}x{C_conv}x{S}x{S}")
    g.notes.append(
        f"ConvNN2d ~{flops / 1e9:.2f} GFLOP per step; Conv2d({C_conv}, {C_conv}, 3) "
        f"~{3 * 2 * B * N * 9 * C_conv**2 / 1e9:.2f} GFLOP"
    )
    convnn_step = _case_step(Case(g.name, "all", "ours", "convnn2d", shape, opts))
    conv_step = _case_step(Case(g.name, "", "conv", "conv2d", conv_shape))
    for threads in (1, 2):
        for busy in (False, True):
            tag = f"{'busy' if busy else 'quiet'}_t{threads}"
            g.runners[f"convnn_{tag}"] = convnn_step
            g.runners[f"conv_{tag}"] = conv_step
            for kind in ("convnn", "conv"):
                g.around[f"{kind}_{tag}"] = functools.partial(_threads, threads, busy)
    return g


GROUPS = {
    "headline": group_headline,
    "window_conv": group_window_conv,
    "local_attention": group_local_attention,
    "local_attention_map": group_local_attention_map,
    "vit_tiny": group_vit_tiny,
    "resnet18": group_resnet18,
    "compile": group_compile,
    "bf16": group_bf16,
    "selection": group_selection,
    "load": group_load,
}

# Every ratio, by group: its runners and its bar (issue 10's table; None: measured, no bar).
# The headline bar "faster than dense by >= 3x" is ours / dense <= 1/3.
RATIOS = {
    "headline": [
        Ratio("headline/dense", "all", "dense", 1 / 3),
        Ratio("headline/gemm_floor", "all", "gemm_floor", 1.3),
        Ratio("window7x7/all", "window", "all", 0.5),
    ],
    "window_conv": [Ratio("window7x7/conv3x3", "window", "conv3x3", 4.0)],
    "local_attention": [Ratio("local_attention/sdpa_masked", "local", "sdpa_masked", 1.0)],
    "local_attention_map": [Ratio("local_attention_56x56/sdpa_masked", "local", "sdpa_masked")],
    "vit_tiny": [
        Ratio("vit_tiny_local/attention", "local", "attention", 1.5),
        Ratio("vit_tiny_kvt/attention", "kvt", "attention", 1.1),
    ],
    "resnet18": [Ratio("resnet18_branching/conv", "branching", "conv", 2.5)],
    "compile": [Ratio("compiled/eager", "compiled", "eager", 1.0)],
    "bf16": [
        Ratio("bf16_selection/fp32_selection", "bf16_selection", "fp32_selection", 1.0),
        Ratio("bf16_tail/fp32_tail", "bf16_tail", "fp32_tail"),
    ],
    "selection": [Ratio("selection_all/score_gemm", "select", "gemm")],
    # issue 10 item 4: a loaded machine slows ConvNN no more than a convolution (<= 1)
    "load": [
        Ratio(f"load_slowdown_{kind}_t{t}", f"{kind}_busy_t{t}", f"{kind}_quiet_t{t}")
        for t in (1, 2)
        for kind in ("convnn", "conv")
    ]
    + [
        Ratio(
            f"load_slowdown_convnn/conv_t{t}",
            f"convnn_busy_t{t}",
            f"conv_busy_t{t}",
            1.0,
            f"convnn_quiet_t{t}",
            f"conv_quiet_t{t}",
        )
        for t in (1, 2)
    ]
    # the second thread on the machine as it is: 2 threads / 1 thread of each, and their ratio
    + [Ratio(f"threads_t2/t1_{k}", f"{k}_quiet_t2", f"{k}_quiet_t1") for k in ("convnn", "conv")]
    + [
        Ratio(
            "threads_t2/t1_convnn/conv",
            "convnn_quiet_t2",
            "conv_quiet_t2",
            1.0,
            "convnn_quiet_t1",
            "conv_quiet_t1",
        )
    ],
}


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        return f"{names[0]} x {len(names)}"
    except OSError:
        return platform.processor() or platform.machine()


def load_average() -> str:
    return "/".join(f"{v:.2f}" for v in os.getloadavg())


def verdict(stats: dict | None, bar: float | None, quick: bool = False) -> str:
    if bar is None:
        return "-"
    if quick:
        return "quick shapes: no verdict"
    if stats is None:
        return "not measured"
    if stats["noisy"]:
        return "noisy: no verdict"
    return "met" if stats["median"] <= bar else "not met"


def run_group(
    g: Group, ratios: list[Ratio], rounds: int, reps: int, quick: bool = False
) -> list[list[str]]:
    """Warm up, interleave, print one line per ratio; returns the summary table's rows."""
    print(f"\n== {g.name}  (load before {load_average()})", flush=True)
    for note in g.notes:
        print(f"  {note}")

    def timed(name):
        with g.around.get(name, contextlib.nullcontext)():
            return _time(g.runners[name], max(reps, g.reps))

    for name in g.runners:
        timed(name)  # warm-up
    times = interleave({k: functools.partial(timed, k) for k in g.runners}, max(rounds, g.rounds))
    medians = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print("  median ms: " + ", ".join(f"{k} {v:.1f}" for k, v in medians.items()))
    rows = []
    for r in ratios:
        ours, base = times[r.ours], times[r.base]
        if r.ours_ref is not None:
            ours = [a / b for a, b in zip(ours, times[r.ours_ref])]
            base = [a / b for a, b in zip(base, times[r.base_ref])]
        stats = ratio_stats(ours, base)
        bar = "-" if r.bar is None else f"<= {r.bar:.2f}"
        print(
            f"  {r.name:30s} {format_ratio(stats):32s} bar {bar:8s} {verdict(stats, r.bar, quick)}"
        )
        rows.append(
            [f"{r.name} ({g.name})", format_ratio(stats), bar, verdict(stats, r.bar, quick)]
        )
    print(f"  load after {load_average()}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reps", type=int, default=1, help="calls timed together per round")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--only", default="", help="groups or ratios whose name contains this")
    parser.add_argument("--quick", action="store_true", help="tiny shapes: a smoke test")
    parser.add_argument("--list", action="store_true", help="list groups and ratios and exit")
    args = parser.parse_args(argv)
    chosen = [
        key for key in GROUPS if args.only in key or any(args.only in r.name for r in RATIOS[key])
    ]
    if args.list:
        for key in chosen:
            print(f"{key}: " + ", ".join(r.name for r in RATIOS[key]))
        return
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {_cpu()}")
    print(native.status())
    print(f"load average (1/5/15 min) at start: {load_average()}")
    table = []
    for key in chosen:
        group = GROUPS[key](args.quick)
        table += run_group(group, RATIOS[key], args.rounds, args.reps, args.quick)
    print(f"\nload average at end: {load_average()}\n")
    print("| ratio | median (range) | bar | verdict |\n|---|---|---|---|")
    for row in table:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
