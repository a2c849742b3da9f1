"""Positional encodings on token sequences with prefix (class / register) tokens (DESIGN.md
2b: "Tokens that have no map position (a class token) get none: no rotation, no bias, zero
coordinates"), against a dense float64 formula written here from DESIGN.md."""

from __future__ import annotations

import math
import os
from contextlib import nullcontext

import pytest
import torch

import convnn.functional as CF
from convnn import ConvNNAttention, convert
from convnn.stages.candidates import Grid

F64 = torch.float64
H, W = 3, 4  # the token map after the prefix tokens
R = 2  # relative_bias max_offset: offsets on the 3 x 4 map reach 3, so some clamp
LAM = 0.3  # coords' lam
ENCODINGS = ["rope", "relative_bias", "coords", "fourier"]
# (name, options, K): every candidate mode that takes prefix tokens, with K = all and K < all
CANDIDATES = [
    ("all-K=N", dict(candidates="all"), None),
    ("all-K<N", dict(candidates="all"), 5),
    ("window", dict(candidates="window", window=3), None),
    ("window-K<all", dict(candidates="window", window=3), 6),
    ("grid", dict(candidates="grid", num_candidates=6), 4),
    ("random", dict(candidates="random", num_candidates=7), 4),  # eval: a fixed draw
    ("ann-every-token", dict(candidates="ann", num_candidates=64), 5),  # budget >= N: exact
]


# --------------------------------------------------------------------------- the formula


def _map_positions(P):
    """(row, col) of each of the P + H * W tokens in grid steps, and whether it has one."""
    t = torch.arange(H * W)
    rc = torch.stack([t // W, t % W], -1)
    pos = torch.cat([torch.zeros(P, 2, dtype=torch.long), rc])
    located = torch.arange(P + H * W) >= P
    return pos, located


def _rope(x, pos, located):
    """2-D rope as complex rotations: the first d/2 channels turn with the row, the last
    d/2 with the column; within a block of D channels, (x_j, x_{j + D/2}) is the complex
    number x_j + i x_{j + D/2} turned by pos * 10000^(-2j/D). Prefix tokens: not turned."""
    d = x.shape[-1]
    D = d // 2
    theta = 10000.0 ** (-2 * torch.arange(D // 2, dtype=F64) / D)
    out = []
    for b in range(2):
        blk = x[..., b * D : (b + 1) * D]
        z = torch.complex(blk[..., : D // 2], blk[..., D // 2 :])
        angle = pos[:, b, None].to(F64) * theta  # (N, D/2)
        turned = z * torch.polar(torch.ones_like(angle), angle)
        turned = torch.where(located[:, None], turned, z)
        out.append(torch.cat([turned.real, turned.imag], -1))
    return torch.cat(out, -1)


def _features(x, kind, P, params):
    """The selection features of x (B, G, N, d) under the encoding ``kind``."""
    pos, located = _map_positions(P)
    if kind == "rope":
        return _rope(x, pos, located)
    if kind in ("coords", "fourier"):
        # normalised to [-1, 1] over the map; prefix tokens: zero coordinates
        p = pos.to(F64) / torch.tensor([H - 1, W - 1], dtype=F64) * 2 - 1
        p = torch.where(located[:, None], p, torch.zeros_like(p))
        if kind == "coords":
            extra = LAM * p
            x = (1 - LAM) * x
        else:
            proj = 2 * math.pi * p @ params["B"].T
            extra = torch.cat([proj.sin(), proj.cos()], -1)
        return torch.cat([x, extra.expand(*x.shape[:2], -1, -1)], -1)
    return x


def _bias(kind, P, params):
    """T[dy, dx] of every (query, key) pair, 0 where either is a prefix token: (G, N, N)."""
    if kind != "relative_bias":
        return 0.0
    pos, located = _map_positions(P)
    dy = (pos[None, :, 0] - pos[:, None, 0]).clamp(-R, R) + R
    dx = (pos[None, :, 1] - pos[:, None, 1]).clamp(-R, R) + R
    both = located[:, None] & located[None, :]
    return params["table"][:, dy, dx] * both


def _candidate_mask(options, P):
    """(N, N) bool: the keys each query may select (DESIGN.md 2, prefix tokens added)."""
    N = P + H * W
    mask = torch.zeros(N, N, dtype=torch.bool)
    if options["candidates"] == "all" or (
        options["candidates"] == "ann" and options["num_candidates"] >= N
    ):  # 'ann' with a budget of every token proposes them all
        return ~mask
    if options["candidates"] == "random":  # one draw over every token, prefix ones included:
        # the library's eval-mode draw is an input here (what the formula checks is the rest)
        mask[:, Grid(1, N).sample(options["num_candidates"], False, None, "cpu")] = True
        return mask
    mask[:, :P] = True  # prefix tokens are candidates of every query
    if options["candidates"] == "window":
        mask[:P] = True  # a prefix query's candidates: every token
        win = options["window"]
        for t in range(H * W):
            r, c = divmod(t, W)
            r0 = min(max(r - win // 2, 0), H - win)  # shifted inside the map at the borders
            c0 = min(max(c - win // 2, 0), W - win)
            for rr in range(r0, r0 + win):
                mask[P + t, P + rr * W + c0 : P + rr * W + c0 + win] = True
    else:  # 'grid': an even lattice over the map, shared by every query
        num = options["num_candidates"]
        gh = min(H, max(1, round(math.sqrt(num * H / W))))
        gw = min(W, max(1, round(num / gh)))
        for i in range(gh):
            for j in range(gw):
                r, c = int((i + 0.5) * H / gh), int((j + 0.5) * W / gw)
                mask[:, P + r * W + c] = True
    return mask


def _scores(fq, fk, kind, P, params):
    """Scaled dot products of encoded features (B, G, N, d'), plus the relative bias."""
    return fq @ fk.transpose(-1, -2) / math.sqrt(fq.shape[-1]) + _bias(kind, P, params)


def formula(q, k, v, kind, P, params, options, K):
    """Dense float64 ConvNN attention (scaled_dot, softmax, kernel 'none') with the map
    tokens encoded and the P prefix tokens not: (B, N, G * d)."""
    B, G, N, d = q.shape
    fq, fk = _features(q, kind, P, params), _features(k, kind, P, params)
    S = _scores(fq, fk, kind, P, params)
    mask = _candidate_mask(options, P)
    count = mask.sum(1)
    ys = []
    for i in range(N):
        Ki = int(count[i]) if K is None else K
        cand = mask[i].nonzero()[:, 0]  # ascending: a stable sort sends ties to the lower index
        s = S[:, :, i, cand]
        order = s.detach().sort(dim=-1, descending=True, stable=True).indices[..., :Ki]
        rho = s.gather(-1, order).softmax(-1)  # (B, G, Ki)
        picked = v[:, :, cand][
            torch.arange(B)[:, None, None], torch.arange(G)[None, :, None], order
        ]
        ys.append(torch.einsum("bgk,bgkd->bgd", rho, picked).reshape(B, G * d))
    return torch.stack(ys, 1)


def formula_at(q, k, v, kind, P, params, idx):
    """The formula over given selections idx (B, G, N, K): softmax over their encoded
    scores, then the sum of their values: (B, N, G * d)."""
    B, G, N, d = q.shape
    fq, fk = _features(q, kind, P, params), _features(k, kind, P, params)
    S = _scores(fq, fk, kind, P, params)
    rho = S.gather(-1, idx).softmax(-1)  # (B, G, N, K)
    picked = v.gather(2, idx.flatten(2)[..., None].expand(-1, -1, -1, d)).view(B, G, N, -1, d)
    return torch.einsum("bgnk,bgnkd->bngd", rho, picked).reshape(B, N, G * d)


# --------------------------------------------------------------------------- the library


def _inputs(kind, P, G=2, d=8, B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    N = P + H * W
    q, k, v = (torch.randn(B, G, N, d, generator=g, dtype=F64) for _ in range(3))
    params = {}
    if kind == "relative_bias":
        params["table"] = torch.randn(G, 2 * R + 1, 2 * R + 1, generator=g, dtype=F64)
    if kind == "fourier":
        params["B"] = torch.randn(3, 2, generator=g, dtype=F64)
    return q, k, v, params


def _options(kind):
    return dict(positional=kind, lam=LAM, max_offset=R, num_frequencies=3)


def _triton_ok(backend):
    if backend != "triton":
        return nullcontext()
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton backend runs on the CPU under TRITON_INTERPRET=1 only")
    return nullcontext()


def _check(kind, P, options, K, backend):
    q64, k64, v64, p64 = _inputs(kind, P)
    dtype = torch.float32 if backend == "triton" else F64
    q, k, v = (t.to(dtype, copy=True).requires_grad_() for t in (q64, k64, v64))
    params = {n: t.to(dtype, copy=True).requires_grad_(n == "table") for n, t in p64.items()}
    with _triton_ok(backend):
        y = CF.convnn_attention(
            q, k, v, K, **options, **_options(kind), hw=(H, W), num_prefix_tokens=P,
            positional_params=params or None, backend=backend,
        )  # fmt: skip
    r = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    (y * r.to(dtype)).sum().backward()
    qr, kr, vr = (t.clone().requires_grad_() for t in (q64, k64, v64))
    pr = {n: t.clone().requires_grad_(n == "table") for n, t in p64.items()}
    yr = formula(qr, kr, vr, kind, P, pr, options, K)
    (yr * r).sum().backward()
    tol = dict(rtol=1e-4, atol=1e-4) if dtype != F64 else dict(rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(y.detach().to(F64), yr.detach(), **tol)
    pairs = [(q, qr), (k, kr), (v, vr)] + [(params[n], pr[n]) for n in pr if n == "table"]
    for ours, ref in pairs:
        torch.testing.assert_close(ours.grad.to(F64), ref.grad, **tol)
    if kind == "relative_bias":  # the encoding acts: the table learns from the map pairs
        assert ref.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", ["reference", "chunked"])
@pytest.mark.parametrize("cand,options,K", CANDIDATES, ids=[c[0] for c in CANDIDATES])
@pytest.mark.parametrize("P", [1, 2])
@pytest.mark.parametrize("kind", ENCODINGS)
def test_prefix_tokens_get_no_encoding(kind, P, cand, options, K, backend):
    """Output and gradients (q, k, v, the relative-bias table) match the formula: map
    tokens encoded by their map position, prefix tokens not at all."""
    _check(kind, P, options, K, backend)


@pytest.mark.parametrize("cand,options,K", CANDIDATES[1::2], ids=[c[0] for c in CANDIDATES[1::2]])
@pytest.mark.parametrize("kind", ENCODINGS)
def test_prefix_tokens_get_no_encoding_triton(kind, cand, options, K):
    """The same on the Triton backend (TRITON_INTERPRET=1 on the CPU), in float32."""
    _check(kind, 1, options, K, "triton")


@pytest.mark.parametrize("cand,options,K", CANDIDATES, ids=[c[0] for c in CANDIDATES])
@pytest.mark.parametrize("kind", ENCODINGS)
def test_layer_with_prefix_tokens_matches_formula(kind, cand, options, K):
    """ConvNNAttention(grid_size, num_prefix_tokens=2) runs the same encoding (its own
    tensors, made random) on its heads."""
    P, G, d = 2, 2, 8
    layer = ConvNNAttention(
        G * d,
        G,
        K,
        kernel="none",
        grid_size=(H, W),
        num_prefix_tokens=P,
        dtype=F64,
        **options,
        **_options(kind),
    ).eval()  # fmt: skip  (eval: 'random' draws its fixed candidates)
    q, k, v, _ = _inputs(kind, P, G, d)
    params = {}
    if layer.positional_params is not None:
        with torch.no_grad():
            for name, t in layer.positional_params.tensors().items():
                if name == "table":
                    t.normal_()
                params[name] = t.detach().clone()
    y = layer.attend(q, k, v, (H, W), P)
    torch.testing.assert_close(y, formula(q, k, v, kind, P, params, options, K))
    # and through forward: the tokens' layout comes from grid_size / num_prefix_tokens
    x = torch.randn(2, P + H * W, G * d, dtype=F64)
    qh, kh, vh = layer._heads(x)
    expected = layer.proj(formula(qh, kh, vh, kind, P, params, options, K))
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("kind", ENCODINGS + ["none"])
@pytest.mark.parametrize("options", [dict(candidates="all"), dict(candidates="window", window=3)])
def test_no_prefix_tokens_is_the_map_alone(kind, options):
    """P = 0 is the path without prefix tokens, bit for bit: num_prefix_tokens=0 equals not
    passing it, and the layer equals the functional call on its heads."""
    q, k, v, params = _inputs(kind, 0)
    run = lambda **kw: CF.convnn_attention(  # noqa: E731
        q, k, v, 5, **options, **_options(kind), hw=(H, W), positional_params=params or None,
        **kw,
    )  # fmt: skip
    assert torch.equal(run(num_prefix_tokens=0), run())
    torch.testing.assert_close(run(), formula(q, k, v, kind, 0, params, options, 5))


@pytest.mark.parametrize("backend", ["reference", "chunked"])
@pytest.mark.parametrize("kind", ENCODINGS)
def test_ann_with_prefix_tokens_indexes_the_encoded_features(kind, backend):
    """'ann' with a budget below N (8 of 14 tokens, 2 tables): the index proposes from the
    selection features with the encoding applied (prefix tokens unencoded), so it picks
    what 'ann' picks on the formula's encoded features given as q and k; the picks come in
    descending encoded score, and output and gradients match the formula over them."""
    P, K = 2, 4
    q64, k64, v64, p64 = _inputs(kind, P)
    ann = dict(candidates="ann", num_candidates=8, ann_tables=2)
    q, k, v = (t.clone().requires_grad_() for t in (q64, k64, v64))
    params = {n: t.clone().requires_grad_(n == "table") for n, t in p64.items()}
    y, idx = CF.convnn_attention(
        q, k, v, K, **ann, **_options(kind), hw=(H, W), num_prefix_tokens=P,
        positional_params=params or None, return_indices=True, backend=backend,
    )  # fmt: skip
    assert idx.shape == (2, 2, P + H * W, K)
    fq, fk = _features(q64, kind, P, p64), _features(k64, kind, P, p64)
    if kind != "relative_bias":  # the bias is in the scores, not the features
        _, plain = CF.convnn_attention(
            fq, fk, v64, K, **ann, return_indices=True, backend=backend
        )  # fmt: skip
        assert torch.equal(idx, plain)
    S = _scores(fq, fk, kind, P, p64)
    picked = S.gather(-1, idx)
    assert (picked[..., :-1] >= picked[..., 1:]).all()
    exact = S.sort(dim=-1, descending=True, stable=True).indices[..., :K]
    assert not torch.equal(idx, exact)  # the budget leaves some query's best keys out
    r = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    (y * r).sum().backward()
    qr, kr, vr = (t.clone().requires_grad_() for t in (q64, k64, v64))
    pr = {n: t.clone().requires_grad_(n == "table") for n, t in p64.items()}
    yr = formula_at(qr, kr, vr, kind, P, pr, idx)
    (yr * r).sum().backward()
    tol = dict(rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(y.detach(), yr.detach(), **tol)
    pairs = [(q, qr), (k, kr), (v, vr)] + [(params[n], pr[n]) for n in pr if n == "table"]
    for ours, ref in pairs:
        torch.testing.assert_close(ours.grad, ref.grad, **tol)


def test_spatial_metric_with_prefix_tokens_is_refused():
    q = torch.randn(1, 2, 13, 4)
    with pytest.raises(ValueError, match="metric='spatial' ranks by position"):
        CF.convnn_attention(q, q, q, 3, metric="spatial", hw=(3, 4), num_prefix_tokens=1)
    with pytest.raises(ValueError, match=r"num_prefix_tokens \+ h \* w = 13, got 2 \+ 3 \* 4"):
        CF.convnn_attention(q, q, q, 3, positional="rope", hw=(3, 4), num_prefix_tokens=2)


# --------------------------------------------------------------------------- a converted ViT


@pytest.mark.parametrize("attention", ["kvt", "branching_attention"])
@pytest.mark.parametrize("kind", ["rope", "relative_bias"])
def test_converted_timm_vit_with_a_class_token_encodes_its_map(kind, attention):
    """A timm ViT (class token: num_prefix_tokens=1, an 8 x 8 map) converted with a
    positional encoding runs forward and backward, and the encoding acts."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    source = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, depth=2,
        num_classes=10,
    )  # fmt: skip
    models = {}
    for positional in ("none", kind):
        model = timm.create_model(
            "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, depth=2,
            num_classes=10,
        )  # fmt: skip
        model.load_state_dict(source.state_dict())
        report = convert(model, conv=None, attention=attention, K=16, positional=positional)
        assert len(report.replaced) == 2
        models[positional] = model.eval()
    encoded = [b.attn.convnn if attention != "kvt" else b.attn for b in models[kind].blocks]
    attn = encoded[0]
    assert (attn.grid_size, attn.num_prefix_tokens, attn._pos_ndim) == ((8, 8), 1, 2)
    if kind == "relative_bias":  # the table starts at zero (the layer without it): move it
        with torch.no_grad():
            for layer in encoded:
                layer.positional_params.table.normal_()
    x = torch.randn(2, 3, 32, 32)
    y = models[kind](x)
    y.square().sum().backward()
    assert y.isfinite().all() and y.shape == (2, 10)
    assert (y - models["none"](x)).abs().max() > 1e-3  # the encoding acts
    grads = [p.grad for p in models[kind].parameters() if p.requires_grad]
    assert all(g is not None and g.isfinite().all() for g in grads)
    if kind == "relative_bias":
        assert attn.positional_params.table.grad.abs().sum() > 0


@pytest.mark.parametrize("layer", ["convnn_attention", "branching_attention", "local"])
@pytest.mark.parametrize("kind", ["rope", "relative_bias", "cpe"])
def test_convnn_vit_encodes_its_map(kind, layer):
    """convnn's own ViT gives its layers the map and its class token ('local' has none), so
    the encoding is 2-D over the patches and leaves the class token alone: in a branching
    layer the ConvNN branch's too, and its 'cpe' acts on the layer's input."""
    from convnn.models.vit import VisionTransformer

    torch.manual_seed(0)
    build = lambda: VisionTransformer(  # noqa: E731  (depth 2: the pooled class token takes no bias in the last layer)
        10, img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2,
        layer=layer, positional=kind,
    )  # fmt: skip
    if (kind, layer) == ("cpe", "branching_attention"):  # was silently skipped
        with pytest.raises(ValueError, match="positional='cpe' changes a layer's input"):
            build()
        return
    model = build()
    attn = model.blocks[0].attn
    prefix = int(layer != "local")
    encoded = attn.convnn if layer == "branching_attention" else attn
    for module in (attn, encoded):
        assert (module.grid_size, module.num_prefix_tokens) == ((4, 4), prefix)
    assert encoded._pos_ndim == 2
    params = encoded.positional_params
    if kind == "relative_bias":
        R = encoded.spec.max_offset
        assert params.table.shape[1:] == (2 * R + 1, 2 * R + 1)
    if params is not None:  # start the learnable encodings off zero: they must act
        with torch.no_grad():
            for t in params.parameters():
                t.normal_()
    y = model(torch.randn(2, 3, 16, 16))
    y.square().sum().backward()
    assert y.shape == (2, 10) and attn.qkv.weight.grad.isfinite().all()
    if params is not None:
        assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in params.parameters())


def test_encoding_of_another_form_than_the_map_is_refused():
    """A layer built for a sequence (no grid_size: 1-D encoding tensors) refuses a 2-D map,
    rather than encode it by one coordinate."""
    layer = ConvNNAttention(16, 2, K=4, positional="rope")
    with pytest.raises(ValueError, match=r"built for 1-D tokens .* got a 3 x 4 map"):
        layer(torch.randn(1, 12, 16), hw=(3, 4))
    assert layer(torch.randn(1, 12, 16), hw=(1, 12)).shape == (1, 12, 16)


def test_bad_prefix_counts_and_maps_are_refused():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="num_prefix_tokens must be at most the 4 tokens"):
        CF.convnn_attention(q, q, q, 2, positional="relative_bias", num_prefix_tokens=6)
    with pytest.raises(ValueError, match=r"num_prefix_tokens \+ h \* w = 4, got 1 \+ 7 \* 7"):
        CF.convnn_attention(q, q, q, 2, hw=(7, 7), num_prefix_tokens=1)  # nothing reads hw
    with pytest.raises(ValueError, match=r"\(the 1 prefix tokens and the 1 x 3 map\)"):
        CF.convnn_attention(q, q, q, 5, positional="rope", num_prefix_tokens=1)


@pytest.mark.parametrize("kind", ["relative_bias", "fourier", "cpe", "rope"])
def test_encodings_under_bf16_autocast(kind):
    """Under bf16 autocast the layer's float32 encoding tensors are cast like the features
    (they were refused as the wrong dtype); the result follows the float32 one."""
    torch.manual_seed(0)
    layer = ConvNNAttention(  # every token: bf16 rounding cannot change a selection
        16, 2, K=None, kernel="none", positional=kind, grid_size=(3, 4), num_prefix_tokens=1
    )
    if layer.positional_params is not None:
        with torch.no_grad():
            for t in layer.positional_params.parameters():
                t.normal_()
    x = torch.randn(2, 13, 16)
    with torch.autocast("cpu", torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    assert (y.float() - layer(x)).abs().max() < 0.1 * layer(x).abs().max()
    y.float().square().sum().backward()
    if layer.positional_params is not None:
        assert all(t.grad is not None for t in layer.positional_params.parameters())
