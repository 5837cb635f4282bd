"""Trunk, head, SSL wrapper and builder: shapes, gradients, torchvision parity, config errors."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from omegaconf import OmegaConf
from torch import nn

from swav.build import build_model
from swav.models import (
    ResNet,
    SSLModel,
    SwAVHead,
    model_from,
    resnet_num_features,
    trunk_width,
)


def _assert_all_grads_finite(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"


# ----------------------------------------------------------------------------- trunk


@pytest.mark.parametrize(
    "depth, width, expected",
    [(18, 1, 512), (34, 1, 512), (50, 1, 2048), (101, 1, 2048), (152, 1, 2048), (18, 2, 1024)],
)
def test_resnet_forward_backward_every_depth(depth, width, expected):
    torch.manual_seed(0)
    model = ResNet(depth=depth, width_multiplier=width, small_stem=True)
    assert model.num_features == expected == resnet_num_features(depth, width)
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out.shape == (2, expected)
    (out * torch.randn_like(out)).sum().backward()
    _assert_all_grads_finite(model)
    # Some gradient must actually flow to the stem, through every stage.
    assert model.conv1.weight.grad.abs().sum() > 0


def test_fractional_width_and_stride_two_small_stem():
    torch.manual_seed(0)
    model = ResNet(depth=18, width_multiplier=0.25, small_stem=True, small_stem_stride=2)
    assert model.num_features == 128 == resnet_num_features(18, 0.25)
    assert model.conv1.weight.shape == (16, 3, 3, 3) and model.conv1.stride == (2, 2)
    maps = model.forward_stages(torch.randn(2, 3, 32, 32), ("conv1", "res5"))
    # Stride 2 in the stem, none in the max-pool's place: 16x16 after it, 2x2 at the end.
    assert maps["conv1"].shape == (2, 16, 16, 16) and maps["res5"].shape == (2, 128, 2, 2)
    out = model(torch.randn(2, 3, 32, 32))
    (out * torch.randn_like(out)).sum().backward()
    _assert_all_grads_finite(model)
    with pytest.raises(ValueError, match="whole number"):
        ResNet(depth=18, width_multiplier=0.3)
    with pytest.raises(ValueError, match="small stem only"):
        ResNet(depth=18, small_stem_stride=2)


@pytest.mark.parametrize(
    "width, features, params_millions",
    # Parameter counts of the SwAV paper's wide ResNets (Table 5), without a classifier.
    [(1, 2048, 23.5), (2, 4096, 94), (4, 8192, 375), (5, 10240, 586)],
)
def test_resnet50_width_multiplier_matches_paper(width, features, params_millions):
    with torch.device("meta"):
        model = ResNet(depth=50, width_multiplier=width)
    assert model.num_features == features == resnet_num_features(50, width)
    assert model.conv1.weight.shape == (64 * width, 3, 7, 7)
    assert model.layer1[0].conv1.weight.shape[0] == 64 * width
    assert model.layer4[0].conv2.weight.shape[0] == 512 * width
    n = sum(p.numel() for p in model.parameters())
    assert abs(n / 1e6 - params_millions) < 0.5


def test_resnet50_loads_into_torchvision_and_gives_same_features():
    torch.manual_seed(0)
    ours = ResNet(depth=50).eval()
    tv = torchvision.models.resnet50()
    tv.fc = nn.Identity()  # no fc keys: a strict load checks every name and shape
    # Give BN non-trivial statistics so a mismatch in any layer shows.
    for m in ours.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.1, 0.1)
    tv.load_state_dict(ours.state_dict(), strict=True)
    tv.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a, b = ours(x), tv(x)
    assert a.shape == b.shape == (2, 2048)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

    # And the other way: torchvision weights (minus fc) load strictly into ours.
    sd = {
        k: v
        for k, v in torchvision.models.resnet50().state_dict().items()
        if not k.startswith("fc.")
    }
    ResNet(depth=50).load_state_dict(sd, strict=True)


@pytest.mark.parametrize(
    "kwargs, tv_builder",
    [
        ({"depth": 18}, torchvision.models.resnet18),
        ({"depth": 34}, torchvision.models.resnet34),
        ({"depth": 101}, torchvision.models.resnet101),
        ({"depth": 152}, torchvision.models.resnet152),
        ({"depth": 50, "groups": 32, "width_per_group": 4}, torchvision.models.resnext50_32x4d),
    ],
)
def test_resnet_state_dict_names_and_shapes_match_torchvision(kwargs, tv_builder):
    with torch.device("meta"):
        ours = ResNet(**kwargs).state_dict()
        ref = {k: v for k, v in tv_builder().state_dict().items() if not k.startswith("fc.")}
    assert list(ours) == list(ref)
    for k in ref:
        assert ours[k].shape == ref[k].shape, k


def test_resnet_init_like_torchvision():
    torch.manual_seed(0)
    model = ResNet(depth=18)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.equal(m.weight, torch.ones_like(m.weight))
            assert torch.equal(m.bias, torch.zeros_like(m.bias))
    w = model.layer4[1].conv2.weight  # 512x512x3x3: kaiming fan_out -> std sqrt(2 / (512 * 9))
    assert abs(w.std().item() / math.sqrt(2 / (512 * 9)) - 1) < 0.02
    assert w.mean().abs() < 1e-3

    zero = ResNet(depth=18, zero_init_residual=True)
    assert all(b.bn2.weight.abs().sum() == 0 for layer in (zero.layer1, zero.layer4) for b in layer)
    assert zero.layer1[0].bn1.weight.abs().sum() > 0


def test_resnet_zero_init_residual_bottleneck():
    torch.manual_seed(0)
    model = ResNet(depth=50, zero_init_residual=True)
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in layer:
            assert block.bn3.weight.abs().sum() == 0
            assert block.bn2.weight.abs().sum() > 0


@pytest.mark.parametrize(
    "small_stem, size, spatial",
    [(True, 32, (32, 32, 16, 8, 4)), (False, 64, (32, 16, 8, 4, 2))],
)
def test_forward_stages_shapes_and_pooled_equals_forward(small_stem, size, spatial):
    torch.manual_seed(0)
    model = ResNet(depth=18, small_stem=small_stem).eval()
    if small_stem:
        assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
        assert isinstance(model.maxpool, nn.Identity)
    x = torch.randn(2, 3, size, size)
    names = ("res5", "conv1", "res2", "res3", "res4")
    with torch.no_grad():
        feats = model.forward_stages(x, names)
        pooled = model(x)
    assert list(feats) == list(names)
    channels = {"conv1": 64, "res2": 64, "res3": 128, "res4": 256, "res5": 512}
    for name, s in zip(("conv1", "res2", "res3", "res4", "res5"), spatial, strict=True):
        assert feats[name].shape == (2, channels[name], s, s), name
    torch.testing.assert_close(feats["res5"].mean(dim=(2, 3)), pooled)
    assert list(model.forward_stages(x, ("res3",))) == ["res3"]
    with pytest.raises(ValueError, match="res6"):
        model.forward_stages(x, ("res6",))


def test_resnet_channels_last_input():
    torch.manual_seed(0)
    model = ResNet(depth=18, small_stem=True).eval()
    x = torch.randn(2, 3, 16, 16)
    x_cl = x.to(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(model(x_cl), model(x), rtol=1e-4, atol=1e-5)
        res5 = model.forward_stages(x_cl)["res5"]
    assert res5.is_contiguous(memory_format=torch.channels_last)


def test_resnet_rejects_bad_arguments():
    with pytest.raises(ValueError, match="depth 42"):
        ResNet(depth=42)
    with pytest.raises(ValueError, match="groups"):
        ResNet(depth=18, groups=32, width_per_group=4)


# ----------------------------------------------------------------------------- head


def _reference_head_f64(head: SwAVHead, x: torch.Tensor):
    """The head's maths in float64 from its parameters (BatchNorm in training mode)."""
    lin1, bn, _, lin2 = head.projection_head
    d = lambda t: t.detach().double()  # noqa: E731
    h = d(x) @ d(lin1.weight).T + d(lin1.bias)
    mean, var = h.mean(0), h.var(0, unbiased=False)
    h = (h - mean) / torch.sqrt(var + bn.eps) * d(bn.weight) + d(bn.bias)
    z = torch.relu(h) @ d(lin2.weight).T + d(lin2.bias)
    z = z / z.norm(dim=1, keepdim=True)
    return z, [z @ d(w).T for w in head.prototype_weights()]


def test_head_matches_float64_reference():
    torch.manual_seed(0)
    head = SwAVHead(dims=[16, 32, 8], use_bn=True, num_clusters=[10, 7])
    nn.init.uniform_(head.projection_head[1].weight, 0.5, 1.5)
    nn.init.uniform_(head.projection_head[1].bias, -0.2, 0.2)
    layers = [type(m) for m in head.projection_head]
    assert layers == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    x = torch.randn(6, 16)
    z, scores = head(x)
    assert z.shape == (6, 8)
    assert [s.shape for s in scores] == [(6, 10), (6, 7)]
    torch.testing.assert_close(z.norm(dim=1), torch.ones(6))
    z_ref, scores_ref = _reference_head_f64(head, x)
    torch.testing.assert_close(z.double(), z_ref, rtol=1e-5, atol=1e-6)
    for s, s_ref in zip(scores, scores_ref, strict=True):
        torch.testing.assert_close(s.double(), s_ref, rtol=1e-5, atol=1e-6)
    sum(s.sum() for s in scores).backward()
    _assert_all_grads_finite(head)


def test_head_variants():
    x = torch.randn(4, 16) * 3
    no_bn = SwAVHead(dims=[16, 32, 32, 8], use_bn=False, num_clusters=[5])
    assert [type(m) for m in no_bn.projection_head] == [nn.Linear, nn.ReLU] * 2 + [nn.Linear]
    assert not any(isinstance(m, nn.BatchNorm1d) for m in no_bn.modules())

    identity = SwAVHead(dims=[16], num_clusters=[5])
    z, (s,) = identity(x)
    torch.testing.assert_close(z, x / x.norm(dim=1, keepdim=True))
    torch.testing.assert_close(s, z @ identity.prototypes0.weight.T)

    raw = SwAVHead(dims=[16], num_clusters=[], normalize_feats=False)
    z, scores = raw(x)
    torch.testing.assert_close(z, x)
    assert scores == [] and raw.prototype_weights() == []
    assert identity.prototypes0.bias is None


def test_head_normalize_prototypes():
    torch.manual_seed(0)
    head = SwAVHead(dims=[8, 4], num_clusters=[6, 3])
    before = [w.detach().clone() * 3 for w in head.prototype_weights()]
    for w, b in zip(head.prototype_weights(), before, strict=True):
        w.data.copy_(b)
    head.normalize_prototypes()
    for w, b in zip(head.prototype_weights(), before, strict=True):
        assert w.requires_grad and w.grad_fn is None
        torch.testing.assert_close(w.norm(dim=1), torch.ones(w.shape[0]))
        torch.testing.assert_close(w, b / b.norm(dim=1, keepdim=True))
    assert head.prototype_weights()[1] is head.prototypes1.weight


# ----------------------------------------------------------------------------- SSL model


class _CountingTrunk(nn.Module):
    """Tiny trunk with BatchNorm that records every call's input."""

    num_features = 6

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.inputs: list[torch.Tensor] = []

    def forward(self, x):
        self.inputs.append(x)
        return torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3))


def _ssl_model(trunk=None):
    trunk = trunk or _CountingTrunk()
    return SSLModel(trunk, nn.ModuleList([SwAVHead(dims=[6, 12, 4], num_clusters=[9])]))


def _multicrop(batch=2):
    return [torch.randn(batch, 3, 32, 32) for _ in range(2)] + [
        torch.randn(batch, 3, 16, 16) for _ in range(4)
    ]


def test_ssl_model_runs_trunk_once_per_resolution():
    torch.manual_seed(0)
    model = _ssl_model()
    crops = _multicrop()
    z, (scores,) = model(crops)
    inputs = model.trunk.inputs
    assert len(inputs) == 2
    torch.testing.assert_close(inputs[0], torch.cat(crops[:2]))
    torch.testing.assert_close(inputs[1], torch.cat(crops[2:]))
    assert z.shape == (12, 4) and scores.shape == (12, 9)

    # Only consecutive crops of one size are grouped.
    model.trunk.inputs.clear()
    model([crops[0], crops[2], crops[1]])
    assert [t.shape[-1] for t in model.trunk.inputs] == [32, 16, 32]

    # Training-mode BN statistics are those of each resolution group.
    model.trunk.inputs.clear()
    model.train()
    z, _ = model(crops)
    z_large, _ = model(crops[:2])
    z_small, _ = model(crops[2:])
    feats = torch.cat([model.trunk(torch.cat(crops[:2])), model.trunk(torch.cat(crops[2:]))])
    torch.testing.assert_close(z, model.heads[0](feats)[0])
    assert not torch.allclose(z[:4], z_large)  # head BN sees all crops at once, not per group


def test_ssl_model_output_is_crop_major_and_equals_per_crop_in_eval():
    torch.manual_seed(0)
    model = _ssl_model()
    model.train()
    model(_multicrop(batch=4))  # non-trivial BN running statistics
    model.eval()
    crops = _multicrop(batch=3)
    with torch.no_grad():
        z, (scores,) = model(crops)
        per_crop = [model([c]) for c in crops]
    torch.testing.assert_close(z, torch.cat([p[0] for p in per_crop]))
    torch.testing.assert_close(scores, torch.cat([p[1][0] for p in per_crop]))
    with torch.no_grad():
        single, _ = model(crops[3])  # a bare tensor is one crop
    torch.testing.assert_close(single, z[9:12])


def test_ssl_model_keeps_channels_last_and_backprops():
    torch.manual_seed(0)
    model = _ssl_model()
    crops = [c.to(memory_format=torch.channels_last) for c in _multicrop()]
    z, (scores,) = model(crops)
    assert all(t.is_contiguous(memory_format=torch.channels_last) for t in model.trunk.inputs)
    scores.square().sum().backward()
    _assert_all_grads_finite(model)


def test_ssl_model_parameter_names_and_delegation():
    model = _ssl_model()
    names = dict(model.named_parameters())
    assert "heads.0.prototypes0.weight" in names
    assert "heads.0.projection_head.0.weight" in names
    assert "heads.0.projection_head.3.weight" in names
    assert model.prototype_weights()[0] is names["heads.0.prototypes0.weight"]
    with torch.no_grad():
        model.heads[0].prototypes0.weight.mul_(5)
    model.normalize_prototypes()
    torch.testing.assert_close(model.prototype_weights()[0].norm(dim=1), torch.ones(9))
    with pytest.raises(ValueError, match="exactly one head"):
        SSLModel(_CountingTrunk(), nn.ModuleList())


# ----------------------------------------------------------------------------- builder


def _cfg(name="resnet", depth=18, width=1, head=None):
    head = (
        head
        if head is not None
        else [["swav_head", {"dims": [512, 64, 16], "use_bn": True, "num_clusters": [20]}]]
    )
    return OmegaConf.create(
        {
            "MODEL": {
                "TRUNK": {
                    "NAME": name,
                    "RESNETS": {
                        "DEPTH": depth,
                        "WIDTH_MULTIPLIER": width,
                        "GROUPS": 1,
                        "WIDTH_PER_GROUP": 64,
                        "ZERO_INIT_RESIDUAL": True,
                        "SMALL_STEM": True,
                    },
                },
                "HEAD": {"PARAMS": head},
            }
        }
    )


def test_build_model_from_config():
    torch.manual_seed(0)
    cfg = _cfg()
    assert trunk_width(cfg.MODEL.TRUNK) == 512
    model = build_model(cfg)
    assert isinstance(model, SSLModel) and isinstance(model.trunk, ResNet)
    assert model.trunk.conv1.kernel_size == (3, 3)
    assert model.trunk.layer1[0].bn2.weight.abs().sum() == 0  # ZERO_INIT_RESIDUAL reached the trunk
    assert model.heads[0].dims == [512, 64, 16] and model.heads[0].num_clusters == [20]
    z, (scores,) = model([torch.randn(2, 3, 16, 16)] * 2)
    assert z.shape == (4, 16) and scores.shape == (4, 20)

    # Plain dicts and lists, without omegaconf: what the models package itself takes.
    plain = {"TRUNK": {"NAME": "resnet", "RESNETS": OmegaConf.to_container(cfg.MODEL.TRUNK.RESNETS)},
             "HEAD": {"PARAMS": [["swav_head", {"dims": [512], "num_clusters": []}]]}}
    assert model_from(plain).heads[0].num_clusters == []


def test_build_model_errors():
    with pytest.raises(ValueError) as err:
        build_model(
            _cfg(depth=50, head=[["swav_head", {"dims": [512, 128], "num_clusters": [3000]}]])
        )
    msg = str(err.value)
    assert "2048" in msg and "512" in msg and "MODEL.HEAD.PARAMS" in msg

    with pytest.raises(ValueError, match="REGNET section"):
        build_model(_cfg(name="regnet"))  # NAME=regnet without the REGNET keys
    with pytest.raises(ValueError, match="resnet"):
        build_model(_cfg(name="vit"))
    with pytest.raises(ValueError, match="eval_mlp"):  # `mlp` is a head (no prototypes); this is not
        build_model(_cfg(head=[["eval_mlp", {"dims": [512, 128]}]]))
    with pytest.raises(ValueError, match="num_clusters"):  # the mlp head takes no prototypes
        build_model(_cfg(head=[["mlp", {"dims": [512, 128], "num_clusters": [10]}]]))
    two = [["swav_head", {"dims": [512, 128]}], ["swav_head", {"dims": [512, 128]}]]
    with pytest.raises(ValueError, match="exactly one"):
        build_model(_cfg(head=two))
    with pytest.raises(ValueError, match="use_bais"):
        build_model(_cfg(head=[["swav_head", {"dims": [512, 128], "use_bais": True}]]))
    with pytest.raises(ValueError, match="depth 42"):
        build_model(_cfg(depth=42))


# ----------------------------------------------------------------------------- RegNet


def _regnet_trunk(name: str):
    from swav.models import RegNet, regnet_block_params

    return RegNet(regnet_block_params(name=name))


@pytest.mark.parametrize("name", ["regnet_y_400mf", "regnet_x_400mf"])
def test_regnet_state_dict_equals_torchvision_minus_fc(name):
    with torch.device("meta"):  # our builder works on meta; torchvision's RegNet does not
        ours = _regnet_trunk(name).state_dict()
    tv = getattr(torchvision.models, name)().state_dict()
    ref = {k: v for k, v in tv.items() if not k.startswith("fc.")}
    assert list(ours) == list(ref)
    for k in ref:
        assert ours[k].shape == ref[k].shape, k


def test_regnet_y_400mf_same_features_as_torchvision_and_backprops():
    torch.manual_seed(0)
    ours = _regnet_trunk("regnet_y_400mf")
    assert ours.num_features == 440 and ours.stage_names == ("conv1", "res2", "res3", "res4", "res5")
    tv = torchvision.models.regnet_y_400mf()
    tv.fc = nn.Identity()
    tv.load_state_dict(ours.state_dict(), strict=True)
    ours.eval(), tv.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), tv(x), rtol=1e-5, atol=1e-5)
        feats = ours.forward_stages(x, ("conv1", "res3", "res5"))
    assert [tuple(f.shape) for f in feats.values()] == [(2, 32, 32, 32), (2, 104, 8, 8), (2, 440, 2, 2)]
    torch.testing.assert_close(feats["res5"].mean(dim=(2, 3)), ours(x))
    ours.train()
    out = ours(x)
    (out * torch.randn_like(out)).sum().backward()
    _assert_all_grads_finite(ours)


def test_regnet_256gf_by_parameters_on_meta():
    from swav.models import RegNet, regnet_block_params, regnet_num_features

    bp = regnet_block_params(depth=27, w_0=640, w_a=230.83, w_m=2.53, group_width=373)
    assert bp.widths == [746, 1492, 4103, 10444] and bp.depths == [2, 7, 17, 1]
    assert regnet_num_features(bp) == 10444
    with torch.device("meta"):
        trunk = RegNet(bp)
    assert trunk.num_features == 10444
    assert trunk.trunk_output.block4[0].f.c[0].out_channels == 10444
    # The named entry is the same network.
    assert regnet_block_params(name="regnet_y_256gf").widths == bp.widths


def test_regnet_argument_errors():
    from swav.models import regnet_block_params

    with pytest.raises(ValueError, match="regnet_y_400mf"):
        regnet_block_params(name="regnet_y_401mf")
    with pytest.raises(ValueError, match="missing \\['w_m', 'group_width'\\]"):
        regnet_block_params(depth=10, w_0=48, w_a=20.0)
    with pytest.raises(ValueError, match="do not also set"):
        regnet_block_params(name="regnet_y_400mf", depth=10)
    with pytest.raises(ValueError, match="w_0=50"):
        regnet_block_params(depth=10, w_0=50, w_a=20.0, w_m=2.0, group_width=8)
