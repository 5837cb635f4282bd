"""Which autocast dtype pays on a device: the one rule that training and evaluation share.

On a GPU, ``AMP_TYPE`` says it, with one exception: bfloat16 needs compute capability 8.0
(Ampere) or newer, the first GPUs whose tensor cores multiply it; on older ones (V100, T4) it
is emulated or refused, so those run float16, which the training step pairs with a gradient
scaler. On a CPU, bfloat16 autocast pays only where the CPU multiplies
bfloat16 natively (AVX512_BF16 or AMX). Elsewhere oneDNN and MKL emulate it, and it is ruinous:
on an AVX2-only AMD EPYC, bfloat16 matmuls ran at 1.3 GFLOP/s against 122 GFLOP/s in float32,
and the CIFAR training step 7x slower (BENCHMARKS.md, machine B). So ``USE_AMP: true`` means "mixed precision where it is faster", and
``CPU_BFLOAT16`` decides on a CPU: ``auto`` (that check), ``always`` or ``never``.
"""

from __future__ import annotations

import functools
import logging

import torch

from swav import distributed

logger = logging.getLogger("swav")

# The first compute capability with bfloat16 tensor cores (Ampere: A100, RTX 30xx).
CUDA_BFLOAT16_CAPABILITY = (8, 0)


@functools.cache
def cpu_has_native_bfloat16() -> bool:
    """True when this CPU has bfloat16 matrix instructions (AVX512_BF16 or AMX tiles)."""
    # torch.cpu's probes are private; without them we cannot tell, and float32 is the safe guess:
    # a missed speed-up of about 2x against a slow-down of up to 200x.
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def cuda_has_bfloat16(device: torch.device) -> bool:
    """True when the GPU `device` multiplies bfloat16 natively (compute capability 8.0 or newer)."""
    return tuple(torch.cuda.get_device_capability(device)) >= CUDA_BFLOAT16_CAPABILITY


@functools.cache
def _warn_bfloat16_fallback(name: str, capability: tuple[int, int]) -> None:
    # Once per process and GPU model: the dtype is asked for several times while a run is built.
    # Every process of a run sees the same GPU model, so rank 0 speaks for them.
    log = logger.warning if distributed.rank() == 0 else logger.info
    log(
        "bfloat16 autocast needs a GPU of compute capability 8.0 (Ampere) or newer and %s has %d.%d: "
        "running float16 autocast instead (training adds a gradient scaler); "
        "config.MODEL.AMP_PARAMS.AMP_TYPE=float16 asks for that without this warning",
        name, *capability,
    )


def autocast_dtype(
    use_amp: bool, device: torch.device, amp_type: str = "bfloat16", cpu_bfloat16: str = "auto"
) -> torch.dtype | None:
    """The dtype to autocast to, or None for plain float32."""
    if not use_amp:
        return None
    if device.type == "cuda" and amp_type == "bfloat16" and not cuda_has_bfloat16(device):
        _warn_bfloat16_fallback(torch.cuda.get_device_name(device), tuple(torch.cuda.get_device_capability(device)))
        return torch.float16
    if device.type != "cpu":
        return torch.bfloat16 if amp_type == "bfloat16" else torch.float16
    native = {"always": True, "never": False}.get(cpu_bfloat16)
    if native is None:
        native = cpu_has_native_bfloat16()
    return torch.bfloat16 if native else None


def describe(use_amp: bool, device: torch.device, dtype: torch.dtype | None) -> str:
    """One line for the log: what runs, and why when USE_AMP was asked for but not used."""
    if dtype is not None:
        return f"{str(dtype).removeprefix('torch.')} autocast"
    if use_amp and device.type == "cpu" and cpu_has_native_bfloat16():
        return "float32 (USE_AMP, but config.MODEL.AMP_PARAMS.CPU_BFLOAT16=never)"
    if use_amp and device.type == "cpu":
        return (
            "float32 (USE_AMP: this CPU has no native bfloat16 instructions, AVX512_BF16 or AMX, "
            "so bfloat16 autocast would be many times slower; config.MODEL.AMP_PARAMS.CPU_BFLOAT16=always "
            "forces it)"
        )
    return "float32"
