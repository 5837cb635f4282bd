"""The CUDA paths: a training step in each precision, channels-last, checkpoints that load on a CPU.

Every test here is marked `cuda` and skipped without a GPU; `pytest -m cuda` runs only these.
They use test_promises.py's tiny RegNet run (32 px crops, batch 8), so each takes seconds.
"""

from __future__ import annotations

import pytest
import torch
from test_promises import TINY

from swav import checkpoint, precision
from swav.build import amp_dtype, build_model, build_step_context, place_model
from swav.config import load_config
from swav.train import train, train_step

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

PRECISIONS = {
    "float32": ["config.MODEL.AMP_PARAMS.USE_AMP=false"],
    "bfloat16": ["config.MODEL.AMP_PARAMS.USE_AMP=true", "config.MODEL.AMP_PARAMS.AMP_TYPE=bfloat16"],
    "float16": ["config.MODEL.AMP_PARAMS.USE_AMP=true", "config.MODEL.AMP_PARAMS.AMP_TYPE=float16"],
}


def _config(tmp_path, *extra: str):
    return load_config([*TINY, f"config.CHECKPOINT.DIR={tmp_path}", "config.MACHINE.DEVICE=cuda", *extra])


def _crops(cfg, device: torch.device) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    batch = cfg.DATA.TRAIN.BATCHSIZE_PER_REPLICA
    return [torch.randn(batch, 3, 32, 32, generator=g).to(device) for _ in range(cfg.LOSS.swav_loss.num_crops)]


def _all_tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _all_tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _all_tensors(v)


@pytest.mark.parametrize("name", list(PRECISIONS))
def test_a_training_step_in_each_precision(tmp_path, name):
    device = torch.device("cuda", torch.cuda.current_device())
    cfg = _config(tmp_path, *PRECISIONS[name])
    # bfloat16 runs only from compute capability 8.0 on; before, the rule of swav.precision
    # chooses float16 and its gradient scaler.
    expected = {"float32": None, "float16": torch.float16,
                "bfloat16": torch.bfloat16 if precision.cuda_has_bfloat16(device) else torch.float16}[name]
    assert amp_dtype(cfg, device) is expected
    torch.manual_seed(0)
    ctx = build_step_context(cfg, place_model(cfg, build_model(cfg), device), device)
    assert (ctx.scaler is not None) == (expected is torch.float16)
    crops = _crops(cfg, device)
    with torch.no_grad(), ctx.autocast():
        _, scores = ctx.model(crops)
    assert scores[0].dtype == (expected or torch.float32)

    before = [p.detach().clone() for p in ctx.model.parameters()]
    losses = [train_step(ctx, crops, i, lr=0.1).item() for i in range(2)]
    assert all(torch.isfinite(torch.tensor(losses)))
    after = list(ctx.model.parameters())
    assert all(p.device == device and p.dtype == torch.float32 for p in after)  # autocast leaves weights float32
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    if ctx.scaler is not None:
        assert ctx.scaler.get_scale() > 0


def test_channels_last_trains_like_the_contiguous_layout(tmp_path):
    device = torch.device("cuda", torch.cuda.current_device())
    losses = {}
    for channels_last in (True, False):
        cfg = _config(tmp_path, *PRECISIONS["float32"], f"config.MODEL.CHANNELS_LAST={channels_last}")
        torch.manual_seed(0)
        ctx = build_step_context(cfg, place_model(cfg, build_model(cfg), device), device)
        conv = next(p for p in ctx.model.parameters() if p.dim() == 4)
        assert conv.is_contiguous(memory_format=torch.channels_last) == channels_last
        losses[channels_last] = train_step(ctx, _crops(cfg, device), 0, lr=0.1).item()
    # The same weights and images: only the convolution algorithms (and their TF32 rounding) differ.
    assert losses[True] == pytest.approx(losses[False], rel=1e-2)


def test_a_checkpoint_written_from_the_gpu_loads_on_the_cpu(tmp_path):
    # float16 too, so that the scaler's state is in the training checkpoint.
    cfg = _config(tmp_path, *PRECISIONS["float16"], "config.OPTIMIZER.num_epochs=1")
    train(cfg)
    for name in (checkpoint.CHECKPOINT_NAME, checkpoint.FINAL_NAME):
        # A plain load, no map_location: tensors come back on the device they were saved from.
        state = torch.load(tmp_path / name, weights_only=True)
        tensors = list(_all_tensors(state))
        assert tensors and all(t.device.type == "cpu" for t in tensors), name
        build_model(cfg).load_state_dict(state["model"])  # a CPU model takes the weights
    state = checkpoint.load(tmp_path / checkpoint.CHECKPOINT_NAME)
    assert state["scaler"] is not None and state["scaler"]["scale"] > 0
    assert state["optimizer"]["state"]  # momentum buffers, saved from the GPU


def test_the_step_augments_on_the_gpu_as_on_the_cpu_without_waiting_for_the_gpu(tmp_path):
    # DATA.TRAIN.GPU_AUGMENT: every choice is made on the host from the draws, so the ops queue
    # on the GPU without a host sync (sync debug mode "error" raises at the first one).
    from swav.build import build_train_transform
    from swav.data import MultiCropDataset, build_dataset, collate_multicrop

    cfg = load_config([*TINY, f"config.CHECKPOINT.DIR={tmp_path}", "config.DATA.TRAIN.TRANSFORMS=[{"
                       '"name": "ImgPilToMultiCrop", "total_num_crops": 4, "num_crops": [2, 2], "size_crops": [32, 16], '
                       '"crop_scales": [[0.2, 1], [0.05, 0.3]]}, {"name": "RandomHorizontalFlip", "p": 0.5}, '
                       '{"name": "ImgPilColorDistortion", "strength": 1.0}, {"name": "ImgPilGaussianBlur", "p": 0.5}, '
                       '{"name": "ToTensor"}, {"name": "Normalize", "mean": [0.5, 0.5, 0.5], "std": [0.2, 0.2, 0.2]}]'])
    transform = build_train_transform(cfg)
    raw = MultiCropDataset(build_dataset(["synthetic"], ["train"], synthetic_num_images=64), transform, seed=0, augment=False)
    batch = collate_multicrop(raw.__getitems__(list(range(64))))
    on_cpu = transform.augment_batch(batch["crops"], batch["draws"])
    crops = [c.pin_memory().cuda(non_blocking=True) for c in batch["crops"]]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        on_gpu = transform.augment_batch(crops, batch["draws"])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for a, b in zip(on_gpu, on_cpu, strict=True):
        torch.testing.assert_close(a.cpu(), b, atol=1e-5, rtol=1e-5)


def test_a_run_with_gpu_augmentation_trains(tmp_path):
    train(_config(tmp_path, "config.DATA.TRAIN.GPU_AUGMENT=true", "config.DATA.NUM_DATALOADER_WORKERS=1"))
    state = checkpoint.load(tmp_path / checkpoint.FINAL_NAME)
    assert not checkpoint.non_finite_tensors(state["model"])
