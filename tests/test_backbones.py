"""Backbones: torchvision parameter-name compatibility, C-channel stems, weight loading, insertion points, timm specs.

The expected torchvision names/shapes are written from torchvision's published architectures
(torchvision itself is not imported: it cannot load here).
"""

from __future__ import annotations

import sys
import types

import pytest
import torch
from platebench.methods import MethodError
from platebench.methods.backbones import INSERTION_POINTS, build_backbone, load_pretrained_state_dict
from platebench.methods.backbones.weights import adapt_first_conv
from torch import nn

# torchvision state_dict entries (name -> shape) for a 3-channel model; heads excluded.
RESNET50_KEYS = {
    "conv1.weight": (64, 3, 7, 7), "bn1.running_mean": (64,), "bn1.num_batches_tracked": (),
    "layer1.0.conv1.weight": (64, 64, 1, 1), "layer1.0.conv2.weight": (64, 64, 3, 3),
    "layer1.0.downsample.0.weight": (256, 64, 1, 1), "layer1.0.downsample.1.running_var": (256,),
    "layer2.0.conv2.weight": (128, 128, 3, 3), "layer2.3.bn3.bias": (512,), "layer3.5.bn3.weight": (1024,),
    "layer4.0.downsample.0.weight": (2048, 1024, 1, 1), "layer4.2.conv3.weight": (2048, 512, 1, 1),
}
DENSENET161_KEYS = {
    "features.conv0.weight": (96, 3, 7, 7), "features.norm0.weight": (96,),
    "features.denseblock1.denselayer1.norm1.weight": (96,),
    "features.denseblock1.denselayer1.conv1.weight": (192, 96, 1, 1),
    "features.denseblock1.denselayer1.norm2.running_mean": (192,),
    "features.denseblock1.denselayer1.conv2.weight": (48, 192, 3, 3),
    "features.denseblock1.denselayer6.norm1.weight": (336,),
    "features.transition1.norm.weight": (384,), "features.transition1.conv.weight": (192, 384, 1, 1),
    "features.transition2.conv.weight": (384, 768, 1, 1), "features.transition3.conv.weight": (1056, 2112, 1, 1),
    "features.denseblock3.denselayer36.norm1.weight": (2064,),
    "features.denseblock4.denselayer24.conv2.weight": (48, 192, 3, 3), "features.norm5.weight": (2208,),
}
# (state_dict entries incl. head, parameters incl. head, head parameters) of torchvision's models.
TORCHVISION_COUNTS = {"resnet50": (320, 25_557_032, 2048 * 1000 + 1000),
                      "densenet121": (727, 7_978_856, 1024 * 1000 + 1000),
                      "densenet161": (967, 28_681_000, 2208 * 1000 + 1000)}


@pytest.mark.parametrize("name,expected", [("resnet50", RESNET50_KEYS), ("densenet161", DENSENET161_KEYS)])
def test_parameter_names_and_shapes_match_torchvision(name, expected):
    backbone = build_backbone(name, 3)
    state = backbone.state_dict()
    for key, shape in expected.items():
        assert key in state, key
        assert tuple(state[key].shape) == shape, key
    entries, params, head = TORCHVISION_COUNTS[name]
    assert len(state) == entries - 2  # head weight and bias
    assert sum(p.numel() for p in backbone.parameters()) == params - head


def test_densenet121_counts_match_torchvision():
    backbone = build_backbone("densenet121", 3)
    entries, params, head = TORCHVISION_COUNTS["densenet121"]
    assert (len(backbone.state_dict()), sum(p.numel() for p in backbone.parameters())) == (entries - 2, params - head)
    assert backbone.out_dim == 1024


@pytest.mark.parametrize("name,key,width,out_dim", [("densenet161", "features.conv0.weight", 96, 2208),
                                                    ("resnet50", "conv1.weight", 64, 2048)])
def test_first_conv_takes_c_channels_and_features_have_out_dim(name, key, width, out_dim):
    backbone = build_backbone(name, 5).eval()
    assert tuple(backbone.state_dict()[key].shape) == (width, 5, 7, 7)
    with torch.no_grad():
        assert tuple(backbone(torch.randn(2, 5, 32, 32)).shape) == (2, out_dim)


def _torchvision_layout(backbone: nn.Module, head: str, legacy: bool = False) -> dict[str, torch.Tensor]:
    state = {k: v.clone() for k, v in backbone.state_dict().items()}
    state[f"{head}.weight"], state[f"{head}.bias"] = torch.randn(1000, backbone.out_dim), torch.randn(1000)
    if legacy:  # torchvision's hosted DenseNet files spell "norm.1" where the module says "norm1"
        state = {k.replace(".norm1.", ".norm.1.").replace(".conv2.", ".conv.2."): v for k, v in state.items()}
    return state


@pytest.mark.parametrize("name,head,legacy", [("resnet-tiny", "fc", False), ("densenet121", "classifier", False),
                                              ("densenet121", "classifier", True)])
def test_torchvision_state_dict_round_trip_gives_identical_outputs(name, head, legacy):
    torch.manual_seed(0)
    source = build_backbone(name, 3)
    for m in source.modules():  # non-trivial statistics so that a missed buffer would show
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    state = _torchvision_layout(source, head, legacy)
    if legacy:
        assert any(".norm.1." in k for k in state)
    torch.manual_seed(1)
    target = build_backbone(name, 3)
    load_pretrained_state_dict(target, state)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(source.eval()(x), target.eval()(x))


def test_first_conv_adaptation_preserves_response_to_channel_constant_images():
    torch.manual_seed(0)
    rgb = build_backbone("resnet-tiny", 3).eval()
    state = _torchvision_layout(rgb, "fc")
    five = build_backbone("resnet-tiny", 5).eval()
    load_pretrained_state_dict(five, state)
    assert torch.allclose(five.conv1.weight, adapt_first_conv(rgb.conv1.weight, 5))
    plane = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.allclose(five(plane.repeat(1, 5, 1, 1)), rgb(plane.repeat(1, 3, 1, 1)), atol=1e-5)


def test_mismatched_state_dicts_are_errors_listing_the_keys():
    backbone = build_backbone("resnet-tiny", 3)
    state = _torchvision_layout(backbone, "fc")
    del state["layer2.0.bn1.weight"]
    state["layer9.weight"] = torch.zeros(1)
    with pytest.raises(MethodError, match=r"missing keys \(1\): layer2\.0\.bn1\.weight; "
                                          r"unexpected keys \(1\): layer9\.weight"):
        load_pretrained_state_dict(backbone, state)
    state = _torchvision_layout(backbone, "fc")
    state["conv1.weight"] = torch.zeros(16, 4, 3, 3)
    with pytest.raises(MethodError, match=r"4 input channels, backbone 3"):
        load_pretrained_state_dict(backbone, state)
    state = _torchvision_layout(backbone, "fc")
    state["layer1.0.conv1.weight"] = torch.zeros(16, 16, 1, 1)
    with pytest.raises(MethodError, match=r"shape mismatches \(1\): layer1\.0\.conv1\.weight \(16, 16, 1, 1\)"):
        load_pretrained_state_dict(backbone, state)


def test_old_files_without_num_batches_tracked_load_every_other_tensor():
    torch.manual_seed(0)
    source = build_backbone("resnet-tiny", 3)
    for m in source.modules():  # statistics a fresh model lacks, so that an unloaded buffer would show
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    state = {k: v for k, v in _torchvision_layout(source, "fc").items() if not k.endswith("num_batches_tracked")}
    torch.manual_seed(1)
    target = build_backbone("resnet-tiny", 3)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.equal(source.eval()(x), target.eval()(x))
        load_pretrained_state_dict(target, state)
        assert torch.equal(source.eval()(x), target.eval()(x))


class _Recorder(nn.Module):
    def __init__(self, name: str, log: list):
        super().__init__()
        self.name, self.log = name, log

    def forward(self, x):
        self.log.append((self.name, x.shape[1]))
        return x


@pytest.mark.parametrize("name", ["resnet-tiny", "densenet121"])
def test_insertion_points_run_in_order_and_identity_inserts_change_nothing(name):
    torch.manual_seed(0)
    backbone = build_backbone(name, 5).eval()
    x = torch.randn(2, 5, 32, 32)
    with torch.no_grad():
        plain = backbone(x)
        log: list = []
        for point in INSERTION_POINTS:
            backbone.set_insert(point, _Recorder(point, log))
        hooked = backbone(x)
    assert [p for p, _ in log] == list(INSERTION_POINTS)
    assert log[-1][1] == backbone.out_dim
    assert torch.equal(plain, hooked)


def test_densenet_res4_is_the_relu_of_norm5():
    backbone = build_backbone("densenet121", 5).eval()
    captured = {}
    backbone.features.norm5.register_forward_hook(lambda m, i, o: captured.update(norm5=o.clone()))
    with torch.no_grad():
        fmap = backbone.feature_map(torch.randn(2, 5, 32, 32))
    assert torch.equal(fmap, torch.relu(captured["norm5"]))


# ---- backbone specs and timm -----------------------------------------------------------------------
def test_unknown_spec_lists_names_and_prefixes():
    with pytest.raises(MethodError, match=r"unknown backbone 'vgg16'.*densenet161.*timm:<name>"):
        build_backbone("vgg16", 3)


def test_timm_spec_without_timm_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # makes `import timm` raise ImportError
    with pytest.raises(MethodError, match=r"timm:resnet50.*pip install timm"):
        build_backbone("timm:resnet50", 3)


class _FakeTimmNet(nn.Module):
    def __init__(self, in_chans: int, stages: int):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Conv2d(in_chans if i == 0 else 4, 4, 3, padding=1) for i in range(stages)])
        self.feature_info = [{"module": f"blocks.{i}", "num_chs": 4} for i in range(stages)]
        self.num_features = 4

    def forward_features(self, x):
        for block in self.blocks:
            x = block(x)
        return x

    def forward(self, x):
        return self.forward_features(x).mean((2, 3))


def _fake_timm(stages: int) -> types.ModuleType:
    module = types.ModuleType("timm")
    module.create_model = lambda name, pretrained, num_classes, in_chans: _FakeTimmNet(in_chans, stages)
    return module


def test_timm_spec_builds_through_the_prefix_registry_and_maps_insertion_points(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", _fake_timm(5))
    backbone = build_backbone("timm:fake_resnet", 6)
    x = torch.randn(2, 6, 8, 8)
    assert tuple(backbone(x).shape) == (2, 4) and backbone.out_dim == 4
    plain = backbone(x)
    backbone.set_insert("res2", _Zero())
    assert torch.equal(backbone(x), backbone.model.blocks[4](backbone.model.blocks[3](torch.zeros(2, 4, 8, 8)))
                       .mean((2, 3)))
    assert not torch.equal(backbone(x), plain)


class _Zero(nn.Module):
    def forward(self, x):
        return torch.zeros_like(x)


def test_timm_model_without_five_stages_refuses_inserts(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", _fake_timm(3))
    backbone = build_backbone("timm:fake_vit", 3)
    with pytest.raises(MethodError, match=r"'fake_vit' has no insertion point 'res1'"):
        backbone.set_insert("res1", _Zero())
