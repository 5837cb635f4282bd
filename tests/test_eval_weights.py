"""Trunk weights: every supported file format loads the same tensors; export round-trips."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from swav.eval.commands import export_main
from swav.models import ResNet, SSLModel, SwAVHead
from swav.weights import export_trunk, load_trunk_weights, trunk_state_dict


def _randomised(model: nn.Module, seed: int) -> nn.Module:
    """Random weights and BN statistics, so a wrong mapping cannot pass by accident."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=g) * 0.5 + (0.5 if "running_var" in name else -0.2))
    return model.eval()


def _tv18(seed: int = 0) -> nn.Module:
    return _randomised(torchvision.models.resnet18(), seed)


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_torchvision_state_dict_gives_torchvision_features(tmp_path):
    tv = _tv18()
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    trunk = ResNet(depth=18)
    info = load_trunk_weights(trunk, tmp_path / "tv.pth")
    assert info["format"] == "torchvision state dict"
    tv.fc = nn.Identity()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(trunk.eval()(x), tv(x))


def test_our_checkpoint_official_and_vissl_formats_load_the_same_trunk(tmp_path):
    source = _randomised(ResNet(depth=18), 1)
    expected = source.state_dict()
    model = SSLModel(source, nn.ModuleList([SwAVHead(dims=[512, 32, 8], num_clusters=[10])]))
    files = {
        # train.py's checkpoint: trunk.* and heads.* next to the optimizer state and the config
        "ours.torch": {"format_version": 1, "model": model.state_dict(), "optimizer": {}, "iteration": 3,
                       "config": "config:\n  MODEL:\n    TRUNK:\n      RESNETS: {DEPTH: 18}\n"},
        # official SwAV release: DataParallel prefix, projection head and prototypes
        "official.pth.tar": {
            **{f"module.{k}": v for k, v in expected.items()},
            "module.projection_head.0.weight": torch.zeros(8, 512),
            "module.prototypes.weight": torch.zeros(10, 8),
        },
        # a training-time wrapper of the same
        "wrapped.pth": {"epoch": 5, "state_dict": {f"module.{k}": v for k, v in expected.items()}},
        # VISSL: classy_state_dict -> base_model -> model -> trunk, with _feature_blocks names
        "vissl.torch": {"classy_state_dict": {"base_model": {"model": {
            "trunk": {f"_feature_blocks.{k}": v for k, v in expected.items()},
            "heads": {"0.clf.0.weight": torch.zeros(4, 512)},
        }}}},
    }
    formats = {}
    for name, obj in files.items():
        torch.save(obj, tmp_path / name)
        trunk = ResNet(depth=18)
        formats[name] = load_trunk_weights(trunk, tmp_path / name)["format"]
        _same(trunk.state_dict(), expected)
    assert formats == {
        "ours.torch": "swav checkpoint",
        "official.pth.tar": "official SwAV release",
        "wrapped.pth": "trunk state dict",  # no heads: nothing says where it comes from
        "vissl.torch": "VISSL checkpoint",
    }


def test_missing_bn_counters_are_tolerated_but_nothing_else(tmp_path):
    state = {k: v for k, v in _tv18().state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "old.pth")
    load_trunk_weights(ResNet(depth=18), tmp_path / "old.pth")
    del state["layer2.0.bn1.weight"]
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match=r"missing 1 keys: layer2\.0\.bn1\.weight"):
        load_trunk_weights(ResNet(depth=18), tmp_path / "broken.pth")


def test_mismatch_lists_keys_and_names_the_trained_trunk(tmp_path):
    model = SSLModel(ResNet(depth=18), nn.ModuleList([SwAVHead(dims=[512, 16], num_clusters=[4])]))
    cfg = "config:\n  MODEL:\n    TRUNK:\n      NAME: resnet\n      RESNETS: {DEPTH: 18, SMALL_STEM: false}\n"
    torch.save({"format_version": 1, "model": model.state_dict(), "config": cfg}, tmp_path / "r18.torch")
    with pytest.raises(ValueError) as e:
        load_trunk_weights(ResNet(depth=34), tmp_path / "r18.torch")
    message = str(e.value)
    assert "missing" in message and "layer1.2.conv1.weight" in message
    assert "config.MODEL.TRUNK.RESNETS.DEPTH=18" in message
    with pytest.raises(ValueError, match="shapes differ"):
        load_trunk_weights(ResNet(depth=18, small_stem=True), tmp_path / "r18.torch")
    torch.save({"epoch": 1, "args": "nothing here"}, tmp_path / "empty.pth")
    with pytest.raises(ValueError, match="no state dict found"):
        load_trunk_weights(ResNet(depth=18), tmp_path / "empty.pth")
    with pytest.raises(FileNotFoundError):
        load_trunk_weights(ResNet(depth=18), tmp_path / "nope.pth")


def test_export_round_trips_into_torchvision(tmp_path):
    source = _randomised(ResNet(depth=18), 2).to(memory_format=torch.channels_last)
    model = SSLModel(source, nn.ModuleList([SwAVHead(dims=[512, 16], num_clusters=[4])]))
    torch.save({"format_version": 1, "model": model.state_dict(), "config": ""}, tmp_path / "ckpt.torch")
    info = export_trunk(tmp_path / "ckpt.torch", tmp_path / "out" / "trunk.pth")
    assert info["format"] == "swav checkpoint" and info["tensors"] == len(source.state_dict())
    exported = torch.load(tmp_path / "out" / "trunk.pth", weights_only=True)
    assert not any(k.startswith(("trunk.", "heads.")) for k in exported)
    assert all(v.is_contiguous() for v in exported.values())
    tv = torchvision.models.resnet18()
    tv.fc = nn.Identity()
    tv.load_state_dict(exported)  # strict: the documented recipe
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(tv.eval()(x), source.eval()(x.contiguous(memory_format=torch.channels_last)))
    again = ResNet(depth=18)
    assert load_trunk_weights(again, tmp_path / "out" / "trunk.pth")["format"] == "trunk state dict"
    _same(again.state_dict(), {k: v.contiguous() for k, v in source.state_dict().items()})
    # The same through the command line; refused formats say why.
    assert export_main([str(tmp_path / "ckpt.torch"), str(tmp_path / "cli.torch")]) == 0
    _same(torch.load(tmp_path / "cli.torch", weights_only=True), exported)
    # safetensors: the same tensors, and they load back into a trunk.
    export_trunk(tmp_path / "ckpt.torch", tmp_path / "trunk.safetensors")
    from safetensors.torch import load_file as load_safetensors

    _same(load_safetensors(str(tmp_path / "trunk.safetensors")), exported)
    again = ResNet(depth=18)
    assert load_trunk_weights(again, tmp_path / "trunk.safetensors")["format"] == "trunk state dict"
    with pytest.raises(ValueError, match="safetensors file name"):
        export_trunk(tmp_path / "ckpt.torch", tmp_path / "trunk.bin")
    state, fmt = trunk_state_dict(torch.load(tmp_path / "ckpt.torch", weights_only=True))
    assert fmt == "swav checkpoint" and set(state) == set(exported)
