"""Config -> objects, in one place: data, model, objective, optimizer, schedule, step context.

Every function reads its own section of the resolved config and hands plain values to the
constructors below it; a ValueError from a constructor becomes a ConfigError here. Training,
evaluation, the report and the benchmarks build what they need from this module.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from swav import precision, syncbn
from swav.config import ConfigError
from swav.data import (
    MultiCropDataset,
    MultiCropTransform,
    ResumableSampler,
    build_dataset,
    build_loader,
    build_transforms,
)
from swav.losses import DeepClusterV2Loss, Objective, SeLaV2Loss, SimCLRLoss, SwAVLoss
from swav.models import build_model, build_trunk  # noqa: F401  (the builders of the model live with it)
from swav.optim import (
    LARC,
    constant_schedule,
    continue_cosine,
    cosine_schedule,
    param_groups,
    step_schedule,
)

logger = logging.getLogger("swav")


def select_device(cfg: DictConfig) -> torch.device:
    """The configured device; on CUDA the one `torch.cuda.set_device` chose for this process."""
    wanted = cfg.MACHINE.DEVICE
    if wanted == "auto":
        wanted = "cuda" if torch.cuda.is_available() else "cpu"
    if wanted in ("cuda", "gpu"):
        if not torch.cuda.is_available():
            raise ConfigError("config.MACHINE.DEVICE=cuda but no CUDA device is available; use cpu or auto")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def build_dataset_from(cfg: DictConfig, sources, paths, limit: int = -1, key: str = "DATA.TRAIN"):
    syn = cfg.DATA.SYNTHETIC
    try:
        return build_dataset(
            list(sources),
            list(paths),
            limit=limit,
            synthetic_num_images={"train": syn.NUM_IMAGES_TRAIN, "test": syn.NUM_IMAGES_TEST},
            synthetic_image_size=syn.IMAGE_SIZE,
            synthetic_num_classes=syn.NUM_CLASSES,
            seed=cfg.SEED_VALUE,
            max_missing_fraction=cfg.DATA.MAX_MISSING_FRACTION,
        )
    except (FileNotFoundError, NotADirectoryError, ValueError) as e:
        raise ConfigError(f"config.{key}.DATA_SOURCES / DATA_PATHS: {e}") from e


def build_train_transform(cfg: DictConfig) -> MultiCropTransform:
    try:
        return build_transforms(OmegaConf.to_container(cfg.DATA.TRAIN.TRANSFORMS))
    except ValueError as e:
        raise ConfigError(f"config.DATA.TRAIN.TRANSFORMS: {e}") from e


def build_train_data(cfg: DictConfig, rank: int, world_size: int, device: torch.device):
    data = cfg.DATA.TRAIN
    dataset = build_dataset_from(cfg, data.DATA_SOURCES, data.DATA_PATHS, data.DATA_LIMIT)
    # With GPU_AUGMENT the workers only decode and cut; the step runs the ops (StepContext.augment).
    multicrop = MultiCropDataset(dataset, build_train_transform(cfg), seed=cfg.SEED_VALUE, augment=not data.GPU_AUGMENT)
    sampler = ResumableSampler(
        len(multicrop), seed=cfg.SEED_VALUE, shuffle=True, rank=rank, world_size=world_size, drop_last=True
    )
    batch = data.BATCHSIZE_PER_REPLICA
    if len(sampler) < batch:
        raise ConfigError(
            f"the training set has {len(dataset)} images, fewer than one global batch "
            f"({batch} x {world_size}); lower config.DATA.TRAIN.BATCHSIZE_PER_REPLICA"
        )
    loader = build_loader(
        multicrop,
        batch_size=batch,
        num_workers=cfg.DATA.NUM_DATALOADER_WORKERS,
        sampler=sampler,
        pin_memory=cfg.DATA.PIN_MEMORY and device.type == "cuda",
    )
    return multicrop, sampler, loader


def build_loss(cfg: DictConfig) -> SwAVLoss:
    c = cfg.LOSS.swav_loss
    return SwAVLoss(
        num_crops=c.num_crops,
        crops_for_assign=tuple(c.crops_for_assign),
        temperature=c.temperature,
        epsilon=c.epsilon,
        num_iters=c.num_iters,
        use_double_precision=c.use_double_precision,
        temp_hard_assignment_iters=c.temp_hard_assignment_iters,
        queue_length=c.queue.local_queue_length,
        queue_start_iter=c.queue.start_iter,
        embedding_dim=c.embedding_dim,
        output_dir=c.output_dir,
        num_prototypes=tuple(c.num_prototypes),
    )


def build_simclr_loss(cfg: DictConfig) -> SimCLRLoss:
    c = cfg.LOSS.simclr_info_nce_loss
    return SimCLRLoss(num_crops=c.num_crops, temperature=c.temperature, embedding_dim=c.embedding_dim)


def build_deepclusterv2_loss(cfg: DictConfig) -> DeepClusterV2Loss:
    c = cfg.LOSS.deepclusterv2_loss
    return DeepClusterV2Loss(
        num_crops=c.num_crops,
        num_clusters=tuple(c.num_clusters),
        crops_for_mb=tuple(c.memory_params.crops_for_mb),
        embedding_dim=c.memory_params.embedding_dim,
        temperature=c.temperature,
        kmeans_iters=c.kmeans_iters,
        seed=cfg.SEED_VALUE,
    )


def build_sela_v2_loss(cfg: DictConfig) -> SeLaV2Loss:
    c = cfg.LOSS.sela_v2_loss
    return SeLaV2Loss(
        num_crops=c.num_crops,
        num_clusters=tuple(c.num_clusters),
        crops_for_mb=tuple(c.memory_params.crops_for_mb),
        embedding_dim=c.memory_params.embedding_dim,
        temperature=c.temperature,
        epsilon=c.epsilon,
        num_iters=c.num_iters,
    )


# LOSS.name -> the function that builds that method's objective from its own config section.
OBJECTIVES: dict[str, Callable[[DictConfig], Objective]] = {
    "swav_loss": build_loss,
    "simclr_info_nce_loss": build_simclr_loss,
    "deepclusterv2_loss": build_deepclusterv2_loss,
    "sela_v2_loss": build_sela_v2_loss,
}


def build_objective(cfg: DictConfig) -> Objective:
    name = cfg.LOSS.name
    if name not in OBJECTIVES:
        raise ConfigError(f"config.LOSS.name={name!r} is not available; use one of {', '.join(OBJECTIVES)}")
    try:
        return OBJECTIVES[name](cfg)
    except ValueError as e:
        raise ConfigError(f"config.LOSS.{name}: {e}") from e


def build_optimizer(cfg: DictConfig, model: nn.Module) -> torch.optim.Optimizer:
    o = cfg.OPTIMIZER
    optimizer = torch.optim.SGD(
        param_groups(model, weight_decay=o.weight_decay),
        lr=0.0,  # set every iteration from the schedule
        momentum=o.momentum,
        nesterov=o.nesterov,
        weight_decay=o.weight_decay,
    )
    if o.use_larc:
        optimizer = LARC(
            optimizer,
            trust_coefficient=o.larc_config.trust_coefficient,
            clip=o.larc_config.clip,
            eps=o.larc_config.eps,
        )
    return optimizer


def build_lr_schedule(cfg: DictConfig, iters_per_epoch: int, num_epochs: int | None = None,
                      restart: tuple[int, float] | None = None) -> np.ndarray:
    """One LR per iteration. `restart` = (iteration, lr): from there on a cosine from that LR to
    the end value, which is how a run resumed with another `num_epochs` continues without a jump."""
    lr = cfg.OPTIMIZER.param_schedulers.lr
    total = (num_epochs or cfg.OPTIMIZER.num_epochs) * iters_per_epoch
    warmup = lr.warmup_epochs * iters_per_epoch
    s = lr.scaled
    if lr.name == "cosine":
        schedule = cosine_schedule(s.base_value, s.end_value, total, warmup_iters=warmup, warmup_start_value=s.warmup_start_value)
        return continue_cosine(schedule, restart[0], restart[1], s.end_value) if restart else schedule
    # The same linear warm-up as cosine_schedule's, then the flat or stepped part.
    head = np.linspace(s.warmup_start_value, s.base_value, warmup, endpoint=False)
    if lr.name == "constant":
        tail = constant_schedule(s.base_value, total - warmup)
    else:
        milestones = [m * iters_per_epoch - warmup for m in lr.milestones]
        tail = step_schedule(s.base_value, total - warmup, milestones, lr.gamma)
    return np.concatenate([head, tail])


def frozen_parameters(model: nn.Module, iter_map) -> list[tuple[nn.Parameter, int]]:
    """[name-or-glob, iterations] pairs -> the parameters whose updates are dropped early on.

    An iteration count of -1 freezes for the whole run (the paper's fixed random prototypes).
    """
    names = dict(model.named_parameters())
    frozen = []
    for pattern, iters in iter_map:
        # VISSL names carry the DistributedDataParallel prefix: module.heads.0.prototypes0.weight
        pattern = pattern.removeprefix("module.")
        matched = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not matched:
            close = [n for n in names if pattern.split(".")[0] in n][:5] or list(names)[-5:]
            raise ConfigError(
                f"config.MODEL.TEMP_FROZEN_PARAMS_ITER_MAP: {pattern!r} matches no parameter; "
                f"names look like {', '.join(close)}"
            )
        until = int(iters)
        if until < -1:
            raise ConfigError(
                f"config.MODEL.TEMP_FROZEN_PARAMS_ITER_MAP: {pattern!r} has {until} iterations; use N >= 0, or -1 for always"
            )
        frozen += [(names[n], until if until >= 0 else sys.maxsize) for n in matched]
    return frozen


def amp_dtype(cfg: DictConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of training on `device` (None: float32); see swav.precision."""
    amp = cfg.MODEL.AMP_PARAMS
    return precision.autocast_dtype(amp.USE_AMP, device, amp.AMP_TYPE, amp.CPU_BFLOAT16)


def autocast_context(cfg: DictConfig, device: torch.device):
    dtype = amp_dtype(cfg, device)
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def unwrap(model: nn.Module) -> nn.Module:
    """The SSL model inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


@dataclass
class StepContext:
    model: nn.Module  # the SSL model, wrapped in DistributedDataParallel when there are several processes
    objective: Objective
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    frozen: list[tuple[nn.Parameter, int]]
    autocast: Callable[[], contextlib.AbstractContextManager]
    device: torch.device
    channels_last: bool
    normalize_prototypes: bool
    # Read each step's loss to stop at the first non-finite one: free on a CPU; on a GPU the read
    # waits for the step's kernels, so there the training loop reads once per logging window.
    check_each_step: bool = True
    # DATA.TRAIN.GPU_AUGMENT: MultiCropTransform.augment_batch, run on the device; None: the loader augments.
    augment: Callable[..., list[torch.Tensor]] | None = None


def place_model(cfg: DictConfig, model: nn.Module, device: torch.device) -> nn.Module:
    """The model on its device, channels-last when configured."""
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if cfg.MODEL.CHANNELS_LAST else model


def build_step_context(cfg: DictConfig, model: nn.Module, device: torch.device) -> StepContext:
    """Everything `train_step` needs for `model` (placed, possibly wrapped in DDP), from the config."""
    core = unwrap(model)
    use_scaler = amp_dtype(cfg, device) == torch.float16
    return StepContext(
        model=model,
        objective=build_objective(cfg).to(device),
        optimizer=build_optimizer(cfg, core),
        scaler=torch.amp.GradScaler("cuda") if use_scaler else None,
        frozen=frozen_parameters(core, cfg.MODEL.TEMP_FROZEN_PARAMS_ITER_MAP),
        autocast=autocast_context(cfg, device),
        device=device,
        channels_last=cfg.MODEL.CHANNELS_LAST,
        normalize_prototypes=normalizes_prototypes(cfg),
        check_each_step=device.type == "cpu",
        augment=build_train_transform(cfg).augment_batch if cfg.DATA.TRAIN.GPU_AUGMENT else None,
    )


def normalizes_prototypes(cfg: DictConfig) -> bool:
    """Whether learned prototypes are put back on the unit sphere before each forward pass: SwAV's
    `normalize_last_layer`; always for SeLa-v2, whose prototypes are SwAV's; DeepCluster-v2 and
    SimCLR train none. A method added from outside the package may have no section."""
    section = cfg.LOSS.get(cfg.LOSS.name) or {}
    return bool(section.get("normalize_last_layer", True))


def wrap_distributed(cfg: DictConfig, model: nn.Module, device: torch.device) -> nn.Module:
    """SyncBatchNorm as configured, then DistributedDataParallel (gradients averaged over ranks)."""
    sync = cfg.MODEL.SYNC_BN_CONFIG
    if sync.CONVERT_BN_TO_SYNC_BN:
        if sync.SYNC_BN_TYPE == "apex":
            logger.info("SYNC_BN_TYPE apex is mapped to native synchronised BatchNorm (apex is not needed)")
        group = syncbn.sync_bn_process_group(sync.GROUP_SIZE, cfg.DISTRIBUTED.NUM_PROC_PER_NODE)
        model = syncbn.convert_sync_batchnorm(model, group, device.type)
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def build_knn_data(cfg: DictConfig) -> tuple:
    k = cfg.KNN_MONITOR
    train_set = build_dataset_from(cfg, k.TRAIN.DATA_SOURCES, k.TRAIN.DATA_PATHS, key="KNN_MONITOR.TRAIN")
    test_set = build_dataset_from(cfg, k.TEST.DATA_SOURCES, k.TEST.DATA_PATHS, key="KNN_MONITOR.TEST")
    return train_set, test_set
