"""Vision Transformers for C-channel images, with timm's parameter names (DeiT/ViT `vit_*_patch16_224` layout).

`vit-small` is ViT-S/16 (384 dims, 12 blocks, 6 heads), `vit-tiny` ViT-Ti/16 (192 dims, 12 blocks, 3 heads):
a C-channel patch embedding (`patch_embed.proj`, a 16×16 stride-16 convolution), a class token, learned
absolute position embeddings built for 224 px (a 14×14 grid plus the class token), pre-norm blocks (LayerNorm
eps 1e-6, multi-head self-attention with one `qkv` projection, an MLP of ratio 4 with GELU) and a final
LayerNorm; the feature (`forward`, size `out_dim`) is the normalised class token (timm's `global_pool="token"`).
Public `vit_small_patch16_224` / `vit_tiny_patch16_224` weights therefore load by name (weights.py adapts the
RGB patch embedding to C channels; the classifier `head.` is dropped).

Other image sizes keep the patch size (the weights' layout): an image whose side is not a multiple of 16 is
zero-padded at the bottom and right to the next multiple (as timm's `dynamic_img_pad`; after per-image
standardisation zero is the image mean), and the 14×14 position grid is resized to the image's grid
(bicubic, antialiased, as timm's `resample_abs_pos_embed`). So 24 px images give a 2×2 grid: cheap enough for
CPU runs on the synthetic presets, though with 4 tokens a ViT sees little spatial structure.

There is no BatchNorm and there are no convolutional stages: `set_insert` and `stages` refuse (feature-statistics
modules act per channel over the pixels of a convolutional feature map), and the methods that normalise with
test-time BatchNorm statistics refuse a ViT (blocks/bn.require_batchnorm).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MethodError
from .base import Backbone

BUILT_FOR = 224  # px: the position grid of the public weights (14×14 for patch 16)
LN_EPS = 1e-6  # timm's and DINOv2's LayerNorm eps in ViTs


class PatchEmbed(nn.Module):
    def __init__(self, in_channels: int, dim: int, patch: int):
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(in_channels, dim, patch, patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, D, ceil(H/p), ceil(W/p)] (bottom/right zero padding to whole patches)."""
        pad_h, pad_w = -x.shape[-2] % self.patch, -x.shape[-1] % self.patch
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        return self.proj(x)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q kᵀ / sqrt(d_head)) v
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(Backbone):
    def __init__(self, name: str, in_channels: int, dim: int, depth: int, heads: int, patch: int = 16,
                 mlp_ratio: float = 4.0):
        super().__init__()
        self.name = name
        self.patch_embed = PatchEmbed(in_channels, dim, patch)  # first: weights.py adapts the first conv
        grid = BUILT_FOR // patch
        self.grid = (grid, grid)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, dim))
        self.blocks = nn.ModuleList([Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.out_dim = dim
        self._init_weights()

    def _init_weights(self) -> None:
        # timm's default ViT initialisation
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def position_embedding(self, grid: tuple[int, int]) -> torch.Tensor:
        """[1, 1 + h·w, D]: the class token's embedding and the patch grid resized to `grid` when it differs."""
        if grid == self.grid:
            return self.pos_embed
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        d = patch_pos.shape[-1]
        patch_pos = patch_pos.reshape(1, *self.grid, d).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(patch_pos, size=grid, mode="bicubic", antialias=True, align_corners=False)
        return torch.cat([cls_pos, patch_pos.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], d)], dim=1)

    def tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """The final-normalised tokens [B, 1 + h·w, D] (class token first) and the patch grid (h, w)."""
        patches = self.patch_embed(x)
        grid = (patches.shape[-2], patches.shape[-1])
        x = patches.flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.position_embedding(grid)
        for block in self.blocks:
            x = block(x)
        return self.norm(x), grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tokens(x)[0][:, 0]

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The normalised patch tokens as a map [B, D, h, w]."""
        tokens, (h, w) = self.tokens(x)
        return tokens[:, 1:].transpose(1, 2).reshape(x.shape[0], -1, h, w)

    def _no_stages(self) -> MethodError:
        return MethodError(f"backbone {self.name!r} has no insertion points (a ViT has no convolutional stages; "
                           f"feature-statistics modules need a ResNet or DenseNet backbone)")

    def stages(self):
        raise self._no_stages()

    def set_insert(self, point: str, module: nn.Module | None) -> None:
        if module is not None:
            raise self._no_stages()
        super().set_insert(point, module)


def vit_small(in_channels: int) -> VisionTransformer:
    return VisionTransformer("vit-small", in_channels, dim=384, depth=12, heads=6)


def vit_tiny(in_channels: int) -> VisionTransformer:
    return VisionTransformer("vit-tiny", in_channels, dim=192, depth=12, heads=3)
