"""USE_AMP on a CPU: bfloat16 only where the CPU has it natively, as CPU_BFLOAT16 says."""

from __future__ import annotations

import pytest
import torch

from swav import precision
from swav.build import autocast_context
from swav.config import ConfigError, load_config
from swav.train import train

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture
def gpu(monkeypatch):
    """Pretend a GPU of the given compute capability is cuda:0; logs the fallback anew."""

    def set_capability(capability: tuple[int, int]) -> None:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: f"a GPU {capability}")
        precision._warn_bfloat16_fallback.cache_clear()

    set_capability((9, 0))
    yield set_capability
    precision._warn_bfloat16_fallback.cache_clear()


@pytest.fixture
def native(monkeypatch):
    """Pretend the CPU has (True) or lacks (False) bfloat16 instructions."""

    def set_native(value: bool) -> None:
        monkeypatch.setattr(precision, "cpu_has_native_bfloat16", lambda: value)

    return set_native


@pytest.mark.parametrize(
    ("use_amp", "device", "amp_type", "cpu_bf16", "has_native", "expected"),
    [
        (False, CPU, "bfloat16", "auto", True, None),
        (True, CPU, "bfloat16", "auto", True, torch.bfloat16),
        (True, CPU, "bfloat16", "auto", False, None),
        (True, CPU, "float16", "auto", True, torch.bfloat16),  # float16 autocast is for GPUs
        (True, CPU, "bfloat16", "always", False, torch.bfloat16),
        (True, CPU, "bfloat16", "never", True, None),
        (True, CUDA, "float16", "never", False, torch.float16),  # CPU_BFLOAT16 says nothing on a GPU
        (True, CUDA, "bfloat16", "auto", False, torch.bfloat16),
        (False, CUDA, "float16", "always", True, None),
    ],
)
def test_autocast_dtype(native, gpu, use_amp, device, amp_type, cpu_bf16, has_native, expected):
    native(has_native)
    assert precision.autocast_dtype(use_amp, device, amp_type, cpu_bf16) is expected


@pytest.mark.parametrize(
    ("capability", "amp_type", "expected", "warns"),
    [
        ((8, 0), "bfloat16", torch.bfloat16, False),  # A100
        ((9, 0), "bfloat16", torch.bfloat16, False),  # H100
        ((7, 0), "bfloat16", torch.float16, True),  # V100: no bfloat16 tensor cores
        ((7, 5), "bfloat16", torch.float16, True),  # T4
        ((7, 0), "float16", torch.float16, False),  # asked for: nothing to say
        ((8, 6), "float16", torch.float16, False),  # float16 stays float16 where bfloat16 would run
    ],
)
def test_bfloat16_on_a_gpu_needs_compute_capability_8(gpu, caplog, capability, amp_type, expected, warns):
    gpu(capability)
    with caplog.at_level("INFO", logger="swav"):
        for _ in range(3):  # a run asks several times while it is built: one warning
            assert precision.autocast_dtype(True, CUDA, amp_type) is expected
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == int(warns)
    if warns:
        assert f"has {capability[0]}.{capability[1]}" in warnings[0].getMessage()
        assert "8.0 (Ampere)" in warnings[0].getMessage()


def test_float16_on_an_older_gpu_gets_the_gradient_scaler(gpu, monkeypatch):
    from swav import build
    from swav.build import build_model, build_step_context

    gpu((7, 0))
    # Stand-ins for what would touch a real GPU: the scaler records that it was made, and the
    # objective (moved to the device) holds no tensors.
    monkeypatch.setattr(torch.amp, "GradScaler", lambda device: ("scaler", device))
    monkeypatch.setattr(build, "build_objective", lambda cfg: torch.nn.Identity())
    cfg = load_config(["config=quickstart", "config.MODEL.AMP_PARAMS.AMP_TYPE=bfloat16"])
    ctx = build_step_context(cfg, build_model(cfg), CUDA)
    assert ctx.scaler == ("scaler", "cuda")
    gpu((8, 0))
    assert build_step_context(cfg, build_model(cfg), CUDA).scaler is None


def test_evaluation_autocast_follows_the_same_rule(gpu):
    from swav.eval.commands import _eval_amp

    cfg = load_config(["config=quickstart", "config.EVAL.AMP=true"])
    gpu((7, 5))
    assert _eval_amp(cfg, CUDA) is torch.float16
    gpu((8, 0))
    assert _eval_amp(cfg, CUDA) is torch.bfloat16
    assert _eval_amp(load_config(["config=quickstart"]), CUDA) is None


def test_the_probe_answers_from_the_cpu_flags():
    # Linux tells the same in /proc/cpuinfo: avx512_bf16 or amx_bf16 among the flags.
    try:
        flags = open("/proc/cpuinfo").read().split()
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    assert precision.cpu_has_native_bfloat16() == bool({"avx512_bf16", "amx_bf16"} & set(flags))


def test_training_config_without_native_bfloat16_runs_float32_and_says_why(native):
    cfg = load_config(["config=quickstart"])
    assert cfg.MODEL.AMP_PARAMS.USE_AMP and cfg.MODEL.AMP_PARAMS.CPU_BFLOAT16 == "auto"
    native(False)
    with autocast_context(cfg, CPU)():
        assert not torch.is_autocast_enabled("cpu")
    native(True)
    with autocast_context(cfg, CPU)():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    forced = load_config(["config=quickstart", "config.MODEL.AMP_PARAMS.CPU_BFLOAT16=always"])
    native(False)
    with autocast_context(forced, CPU)():
        assert torch.is_autocast_enabled("cpu")


def test_the_training_log_names_the_precision(native, tmp_path):
    native(False)
    cfg = load_config([
        "config=quickstart", f"config.CHECKPOINT.DIR={tmp_path}", "config.DATA.SYNTHETIC.NUM_IMAGES_TRAIN=8",
        "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=4", "config.OPTIMIZER.num_epochs=1",
        "config.OPTIMIZER.param_schedulers.lr.warmup_epochs=0", "config.KNN_MONITOR.ENABLED=false",
        "config.MODEL.TEMP_FROZEN_PARAMS_ITER_MAP=[]",
        'config.MODEL.HEAD.PARAMS=[["swav_head", {"dims": [512, 32, 16], "use_bn": true, "num_clusters": [10]}]]',
    ])
    train(cfg)
    log = (tmp_path / "log.txt").read_text()
    assert "float32 (USE_AMP: this CPU has no native bfloat16" in log
    assert "CPU_BFLOAT16=always" in log


@pytest.mark.parametrize("value", ["maybe", "true", "0"])
def test_cpu_bfloat16_accepts_auto_always_never_only(value):
    with pytest.raises(ConfigError, match="CPU_BFLOAT16"):
        load_config([f"config.MODEL.AMP_PARAMS.CPU_BFLOAT16={value}"])
