"""Vision Transformer (timm parameter names) with a choice of attention layer."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..nn import ConvNNAttention, make_attention_layer
from ..nn.convert import default_window
from .api import TimmModelAPI
from .registry import VIT_LAYERS, register


class PatchEmbed(nn.Module):
    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(
                f"img_size must be divisible by patch_size ({patch_size}), got {img_size}"
            )
        self.grid_size = (img_size // patch_size,) * 2
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, H/p * W/p, D)."""
        return self.proj(x).flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class Block(nn.Module):
    def __init__(self, dim: int, attn: nn.Module, mlp_ratio: float, drop: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = attn
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x: Tensor, hw: tuple[int, int] | None = None) -> Tensor:
        x = x + self.attn(self.norm1(x), hw=hw)
        return x + self.mlp(self.norm2(x))


class VisionTransformer(TimmModelAPI, nn.Module):
    """timm's ViT: ``patch_embed.proj``, ``cls_token``, ``pos_embed``, ``blocks.N.{norm1,
    attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}``, ``norm``, ``head``.

    ``layer`` picks the attention of every block: 'attention' (exact multi-head
    self-attention, run by SDPA), 'convnn_attention', 'kvt', 'branching_attention' or
    'local'. Local (window) attention needs the tokens to form a map, so that model has no
    class token and averages the tokens (timm's ``class_token=False, global_pool='avg'``).
    With a positional encoding (``positional=``) the layers get the token map and the class
    token (``grid_size``, ``num_prefix_tokens``): the patches are encoded by their 2-D map
    position, the class token not at all. (Before 2026-11-29 a model with a class token
    encoded the tokens by their 1-D sequence index; its checkpoints load, with their old
    outputs, into a model built with ``grid_size=None, num_prefix_tokens=0``. A 'local'
    model encoded its 2-D map by one coordinate, a bug: its encoding is 2-D now too.)
    timm's model API: see :class:`TimmModelAPI`.
    """

    _first_conv = "patch_embed.proj"

    def __init__(
        self,
        num_classes: int = 1000,
        in_chans: int = 3,
        img_size: int = 224,
        layer: str = "attention",
        patch_size: int = 16,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        **layer_kwargs,
    ) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.grid_size = self.patch_embed.grid_size
        side = self.grid_size[0]
        self.class_token = layer != "local"
        num_tokens = side * side + int(self.class_token)
        if self.class_token:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        if layer == "local":
            window = layer_kwargs.pop("window", default_window(self.grid_size))
            layer_kwargs = {"window": window, "K": window * window, **layer_kwargs}
        if layer in ("kvt", "convnn_attention", "branching_attention"):
            layer_kwargs.setdefault("K", min(9, num_tokens))
        if layer_kwargs.get("positional", "none") != "none":
            # the encoding reads each token's map position; the class token has none
            prefix = int(self.class_token)
            layer_kwargs = {
                "grid_size": self.grid_size,
                "num_prefix_tokens": prefix,
                **layer_kwargs,
            }
        self.blocks = nn.ModuleList(
            Block(
                embed_dim,
                self._attention(
                    embed_dim, num_heads, layer, qkv_bias, attn_drop_rate, layer_kwargs
                ),
                mlp_ratio,
                drop_rate,
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes)
        self.num_classes, self.num_features = num_classes, embed_dim
        self.num_prefix_tokens = int(self.class_token)
        self._init_weights()
        self._init_api(in_chans, img_size)

    @staticmethod
    def _attention(dim, heads, layer, qkv_bias, attn_drop, layer_kwargs) -> nn.Module:
        if layer == "attention":
            return ConvNNAttention(
                dim, heads, K=None, kernel="none", qkv_bias=qkv_bias, attn_drop=attn_drop
            )
        return make_attention_layer(
            dim, heads, layer, qkv_bias=qkv_bias, attn_drop=attn_drop, **layer_kwargs
        )

    def _init_weights(self) -> None:  # timm's defaults
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.class_token:
            nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, N, D) tokens after the final norm."""
        x = self.patch_embed(x)
        if self.class_token:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1)
        x = self.pos_drop(x + self.pos_embed)
        hw = None if self.class_token else self.grid_size
        for blk in self.blocks:
            x = blk(x, hw)
        return self.norm(x)

    def _pool(self, x: Tensor) -> Tensor:
        return x[:, 0] if self.class_token else x.mean(1)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"} if self.class_token else {"pos_embed"}


SIZES = {
    "vit_tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12),
}

for _name, _size in SIZES.items():
    register(_name, VIT_LAYERS, VisionTransformer)(
        lambda _s=_size, **kw: VisionTransformer(**{**_s, **kw})
    )
