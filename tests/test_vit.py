"""ViT backbones: timm's parameter layout, the ViT equations, small images, and the methods that refuse a ViT.

The expected names, shapes and counts are timm's published `vit_small_patch16_224` / `vit_tiny_patch16_224`
(22,050,664 and 5,717,416 parameters with their 1000-class head); the reference forward is written from the ViT
paper's equations (Dosovitskiy et al. 2021, eqs. 1-4), not from the project's modules.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from platebench.methods import MethodError
from platebench.methods.abra import ABRA, ABRATTA
from platebench.methods.adabn import AdaBN
from platebench.methods.advstyle import AdvStyle, AdvStyleTTA
from platebench.methods.arm_bn import ARMBN
from platebench.methods.backbones import build_backbone
from platebench.methods.ben import BEN
from platebench.methods.cs_arm_bn import CSARMBN
from platebench.methods.dsu import DSU
from platebench.methods.erm import ERM
from platebench.methods.mixstyle import MixStyle
from platebench.methods.testing import build, check_loss_decreases, check_track

VIT_SMALL_KEYS = {
    "cls_token": (1, 1, 384), "pos_embed": (1, 197, 384), "patch_embed.proj.weight": (384, 3, 16, 16),
    "patch_embed.proj.bias": (384,), "blocks.0.norm1.weight": (384,), "blocks.0.attn.qkv.weight": (1152, 384),
    "blocks.0.attn.qkv.bias": (1152,), "blocks.0.attn.proj.weight": (384, 384), "blocks.5.norm2.bias": (384,),
    "blocks.11.mlp.fc1.weight": (1536, 384), "blocks.11.mlp.fc2.weight": (384, 1536), "norm.weight": (384,),
}
# (state_dict entries incl. head, parameters incl. head, head parameters) of timm's models
TIMM_COUNTS = {"vit-small": (152, 22_050_664, 384 * 1000 + 1000), "vit-tiny": (152, 5_717_416, 192 * 1000 + 1000)}


@pytest.mark.parametrize("name", ["vit-small", "vit-tiny"])
def test_parameter_names_and_counts_match_timm(name):
    backbone = build_backbone(name, 3)
    state = backbone.state_dict()
    if name == "vit-small":
        assert {k: tuple(state[k].shape) for k in VIT_SMALL_KEYS} == VIT_SMALL_KEYS
    entries, params, head = TIMM_COUNTS[name]
    assert len(state) == entries - 2
    assert sum(p.numel() for p in backbone.parameters()) == params - head


def _layer_norm(x, norm):
    mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-6) * norm.weight + norm.bias


def _reference_vit(vit, x):
    """Eqs. 1-4: patches·E + pos (with the class token), L × [MSA(LN(z)) + z, MLP(LN(z')) + z'], LN(z_L^0)."""
    b, c, h, w = x.shape
    p = 16
    patches = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // p) * (w // p), -1)
    weight = vit.patch_embed.proj.weight.reshape(vit.out_dim, -1)  # flattened (channel, row, column)
    z = torch.cat([vit.cls_token.expand(b, 1, -1), patches @ weight.T + vit.patch_embed.proj.bias], 1) + vit.pos_embed
    d = vit.out_dim
    for block in vit.blocks:
        heads = block.attn.heads
        dh = d // heads
        y = _layer_norm(z, block.norm1)
        wq, wk, wv = block.attn.qkv.weight.split(d)
        bq, bk, bv = block.attn.qkv.bias.split(d)
        outs = []
        for i in range(heads):
            rows = slice(i * dh, (i + 1) * dh)
            q, k, v = (y @ wm[rows].T + bm[rows] for wm, bm in ((wq, bq), (wk, bk), (wv, bv)))
            outs.append(torch.softmax(q @ k.transpose(1, 2) / math.sqrt(dh), -1) @ v)
        z = z + torch.cat(outs, -1) @ block.attn.proj.weight.T + block.attn.proj.bias
        y = _layer_norm(z, block.norm2) @ block.mlp.fc1.weight.T + block.mlp.fc1.bias
        y = 0.5 * y * (1 + torch.erf(y / math.sqrt(2)))  # GELU
        z = z + y @ block.mlp.fc2.weight.T + block.mlp.fc2.bias
    return _layer_norm(z[:, 0], vit.norm)


def test_forward_is_the_vit_equations_at_the_built_size():
    torch.manual_seed(0)
    vit = build_backbone("vit-tiny", 5).double().eval()
    x = torch.randn(2, 5, 224, 224, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(vit(x), _reference_vit(vit, x), atol=1e-9, rtol=0)


def test_small_images_are_padded_to_whole_patches_and_the_position_grid_resized():
    torch.manual_seed(0)
    vit = build_backbone("vit-tiny", 5).eval()
    x = torch.randn(2, 5, 24, 24)
    with torch.no_grad():
        assert vit.feature_map(x).shape == (2, 192, 2, 2)
        # bottom/right zero padding: the same as a 32 px image holding x in its top-left corner
        assert torch.allclose(vit(x), vit(F.pad(x, (0, 8, 0, 8))), atol=1e-6)
        assert vit.position_embedding((14, 14)) is vit.pos_embed
        # resizing keeps what is constant over the grid and leaves the class token's embedding alone
        vit.pos_embed[:, 1:] = torch.randn(192)
        resized = vit.position_embedding((3, 2))
    assert resized.shape == (1, 7, 192)
    assert torch.allclose(resized[:, 1:], vit.pos_embed[:, 1:2].expand(1, 6, 192), atol=1e-5)
    assert torch.equal(resized[:, 0], vit.pos_embed[:, 0])


def test_erm_predictions_on_a_vit_do_not_depend_on_the_batch():
    check_track(ERM, backbone="vit-tiny")


@pytest.mark.slow  # 15 steps of a 5.6M-parameter network: about 10 s on a shared CPU
def test_erm_loss_decreases_on_a_vit():
    check_loss_decreases(ERM, backbone="vit-tiny")


@pytest.mark.parametrize("cls", [AdaBN, ARMBN, BEN, CSARMBN])
def test_batchnorm_statistics_methods_refuse_a_vit_in_one_line(cls):
    with pytest.raises(MethodError, match=rf"^method '{cls.name}' adapts BatchNorm statistics, but backbone "
                                          r"'vit-tiny' has no BatchNorm layer: use a ResNet or DenseNet backbone$"):
        build(cls, backbone="vit-tiny")


@pytest.mark.parametrize("cls", [MixStyle, DSU, AdvStyle, AdvStyleTTA, ABRA, ABRATTA])
def test_feature_statistics_methods_refuse_a_vit_in_one_line(cls):
    with pytest.raises(MethodError, match=r"^backbone 'vit-tiny' has no insertion points \(a ViT has no "
                                          r"convolutional stages; [^\n]*\)$"):
        build(cls, backbone="vit-tiny")
