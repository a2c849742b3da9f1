"""The benchmark's cases: which implementations (roles) are measured at which sizes.

Nothing here imports torch, so ``convnn bench --list`` and ``--help`` are instant.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

__all__ = [
    "COSINE_K9",
    "MEMCHECK_SCOPE",
    "SUITES",
    "SWEEP_SIDES",
    "TARGET_SCOPE",
    "Case",
    "build_cases",
    "comparisons",
    "conv_config",
    "partners",
    "sweep_scope",
]

SUITES = ("quick", "conv", "attention", "sweep", "precision", "full")
ROLES = ("ours", "chunked", "triton", "dense", "conv", "sdpa", "kvt")
BASELINES = {"dense": "dense", "conv": "nn.Conv2d 3x3", "sdpa": "SDPA", "kvt": "dense KVT"}
MIB = 2**20
GIB = 2**30
NUM_CANDIDATES = 64  # 'random' and 'grid' candidates
CONV_WINDOW = 7  # 'window' candidates of ConvNN2d: 7 x 7
SWEEP_SIDES = (32, 64, 128, 192, 256)


@dataclass
class Case:
    """One measured implementation at one size.

    kind: 'convnn2d' | 'conv2d' (shape (B, C, H, W)), 'attention' | 'sdpa' | 'kvt'
    (shape (B, N, dim)); options: module keyword arguments; backend: for ConvNN modules.
    """

    scope: str
    config: str
    role: str
    kind: str
    shape: tuple[int, ...]
    options: dict = field(default_factory=dict)
    backend: str = "auto"
    heads: int = 1
    est_bytes: int = 0  # estimated O(N*M) / O(N*K*C) footprint; over the budget: skipped

    @property
    def name(self) -> str:
        return f"{self.scope} | {self.config} | {self.role}"

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Case:
        data = json.loads(text)
        data["shape"] = tuple(data["shape"])
        return cls(**data)


def conv_config(metric: str, candidates: str, K: int) -> tuple[str, dict]:
    options = dict(K=K, metric=metric, candidates=candidates)
    label = f"{metric} {candidates}"
    if candidates in ("random", "grid"):
        options["num_candidates"] = NUM_CANDIDATES
        label += f"({NUM_CANDIDATES})"
    if candidates == "window":
        options["window"] = CONV_WINDOW
        label += f"({CONV_WINDOW}x{CONV_WINDOW})"
    return f"{label} K={K}", options


def _conv_cases(scope, shape, configs, device, dense=True, conv=True) -> list[Case]:
    B, _, H, W = shape
    cases = []
    for metric, candidates, K in configs:
        config, options = conv_config(metric, candidates, K)
        roles = ["ours"] + (["chunked", "triton"] if device == "cuda" else [])
        roles += ["dense"] if dense else []
        M = NUM_CANDIDATES if candidates in ("random", "grid") else H * W
        for role in roles:
            backend = {"ours": "auto", "dense": "reference"}.get(role, role)
            # dense: the (B, N, M) scores and copies of the (B, N, K, C) gathered neighbours
            nbytes = B * H * W * (M + 3 * K * shape[1]) * 4 if role == "dense" else 0
            cases.append(Case(scope, config, role, "convnn2d", shape, options, backend, 1, nbytes))
    if conv:
        cases.append(Case(scope, "", "conv", "conv2d", shape))
    return cases


def _attention_cases(scope, shape, heads, device) -> list[Case]:
    B, N, _ = shape
    side = math.isqrt(N)
    window = 7 if side * side == N else 49  # a 7 x 7 map window, or 49 tokens of a 1 x N row
    extra = ["chunked", "triton"] if device == "cuda" else []
    configs = [
        ("all K=9", dict(K=9), ["ours", *extra, "dense"]),
        ("all K=16", dict(K=16), ["ours", *extra, "dense"]),
        (
            f"window({window}) K=9",
            dict(K=9, candidates="window", window=window),
            ["ours", *extra, "dense"],
        ),
        # K=None under the auto backend is exactly attention, so it dispatches to SDPA; the
        # chunked row is the ConvNN operator itself with K = N.
        ("all K=all", dict(K=None, kernel="none"), ["ours", "chunked", *extra[1:], "dense"]),
    ]
    cases = []
    for config, options, roles in configs:
        K = options["K"] or N
        for role in roles:
            backend = {"ours": "auto", "dense": "reference"}.get(role, role)
            # Softmax weights gather (B, heads, N, K, d) keys on every backend (and dense
            # copies its (B, N, K, C) neighbours); the dense scores are (B, heads, N, N).
            nbytes = 3 * B * N * K * shape[2] * 4 + (
                B * heads * N * N * 4 if role == "dense" else 0
            )
            if role == "ours" and options["K"] is None:
                nbytes = 0  # dispatched to SDPA
            cases.append(
                Case(scope, config, role, "attention", shape, options, backend, heads, nbytes)
            )
    cases.append(Case(scope, "", "sdpa", "sdpa", shape, {}, "auto", heads))
    for K in (9, 16):
        nbytes = 3 * B * heads * N * N * 4
        cases.append(Case(scope, f"K={K}", "kvt", "kvt", shape, dict(K=K), "auto", heads, nbytes))
    return cases


TARGET_SCOPE = "target 8x64x64x64"
MEMCHECK_SCOPE = "memcheck 1x64x128x128"
STAGE1_SCOPE = "resnet-s1 {b}x64x56x56"
COSINE_K9 = ("cosine", "all", 9)
# A non-GEMM metric and a relative position bias: both stream block by block, so the peak
# stays far below one 16384 x 16384 fp32 score matrix (1 GiB).
DESIGN_SPACE_MEMCHECK = Case(
    MEMCHECK_SCOPE,
    "manhattan relative_bias K=9",
    "ours",
    "convnn2d",
    (1, 64, 128, 128),
    dict(K=9, metric="manhattan", positional="relative_bias", weighting="softmax"),
)


def sweep_scope(side: int) -> str:
    """The sweep's scope at side x side (its 128 x 128 point is the memory-check case)."""
    return MEMCHECK_SCOPE if side == 128 else f"sweep 1x64x{side}x{side}"


def build_cases(suite: str, device: str = "cpu") -> list[Case]:
    """The cases of a suite ('full' = conv + attention + sweep; 'precision' has no cases)."""
    if suite not in SUITES:
        raise ValueError(f"suite must be one of {', '.join(SUITES)}, got {suite!r}")
    cuda = device == "cuda"
    if suite == "quick":  # tiny: a smoke test of the harness, seconds on any machine
        return _conv_cases("quick 2x8x8x8", (2, 8, 8, 8), [COSINE_K9], device) + [
            Case("quick 2x16x32", "all K=4", "ours", "attention", (2, 16, 32), dict(K=4), heads=2),
            Case("quick 2x16x32", "", "sdpa", "sdpa", (2, 16, 32), heads=2),
        ]
    cases: list[Case] = []
    if suite in ("conv", "full"):
        b = 64 if cuda else 8
        every = [
            (metric, candidates, K)
            for metric in ("cosine", "euclidean")
            for candidates in ("all", "random", "grid", "window")
            for K in (9, 16)
        ]
        cases += _conv_cases(f"cifar {b}x64x32x32", (b, 64, 32, 32), every, device)
        cases += _conv_cases(TARGET_SCOPE, (8, 64, 64, 64), [COSINE_K9], device)
        stage = [COSINE_K9, ("cosine", "all", 16), ("cosine", "window", 9)]
        b = 32 if cuda else 8
        cases += _conv_cases(STAGE1_SCOPE.format(b=b), (b, 64, 56, 56), stage, device)
        cases += _conv_cases(f"resnet-s2 {b}x128x28x28", (b, 128, 28, 28), stage, device)
        cases += _conv_cases(MEMCHECK_SCOPE, (1, 64, 128, 128), [COSINE_K9], device, conv=False)
        cases.append(DESIGN_SPACE_MEMCHECK)
    if suite in ("attention", "full"):
        for n, b_cpu, b_cuda in ((197, 8, 64), (1024, 2, 16)):
            for dim, heads, tag in ((192, 3, "vit-ti"), (768, 12, "vit-b")):
                b = b_cuda if cuda else b_cpu
                cases += _attention_cases(f"{tag} {b}x{n}x{dim}", (b, n, dim), heads, device)
    if suite in ("sweep", "full"):
        for side in SWEEP_SIDES:
            if side == 128 and suite == "full":
                continue  # the memory-check case above
            shape = (1, 64, side, side)
            cases += _conv_cases(sweep_scope(side), shape, [COSINE_K9], device, conv=False)
    return cases


CONVNN_ROLES = ("ours", "chunked", "triton", "dense")


def partners(role: str, kind: str, config: str, K: int | None) -> list[tuple[str, str]]:
    """The (role, config) of the baselines an implementation (``role``, ``kind``, ``config``
    and ``K`` of a case) is compared with, in its scope: dense (same config), conv for
    ConvNN2d; dense, SDPA and KVT of the same K for attention."""
    if role not in ("ours", "chunked", "triton"):
        return []
    out = [("dense", config)]
    if kind == "convnn2d":
        out.append(("conv", ""))
    else:
        out.append(("sdpa", ""))
        if K is not None:
            out.append(("kvt", f"K={K}"))
    return out


def comparisons(cases: list[Case]) -> list[tuple[str, list[Case]]]:
    """The cases grouped into comparisons, each timed round by round together: per scope and
    ConvNN config, its implementations and the scope's baselines they are compared with
    (a baseline shared by several configs is measured again in each). Baselines nobody is
    compared with form one last comparison of their scope. Returns (config, cases) pairs."""
    out: list[tuple[str, list[Case]]] = []
    scopes = list(dict.fromkeys(c.scope for c in cases))
    for scope in scopes:
        here = [c for c in cases if c.scope == scope]
        used: set[int] = set()
        for config in dict.fromkeys(c.config for c in here if c.role in CONVNN_ROLES):
            members = [c for c in here if c.role in CONVNN_ROLES and c.config == config]
            wanted = {
                p for c in members for p in partners(c.role, c.kind, c.config, c.options.get("K"))
            }
            members += [
                c for c in here if c.role not in CONVNN_ROLES and (c.role, c.config) in wanted
            ]
            used.update(id(c) for c in members)
            out.append((config, members))
        rest = [c for c in here if id(c) not in used]
        if rest:
            out.append(("", rest))
    return out
