"""The kNN monitor of a training run: weighted kNN of the trunk on a labelled split, between epochs."""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from torch import nn

from swav import distributed
from swav.build import build_model
from swav.eval.knn import evaluate_knn
from swav.runlog import RunLogger


def run_knn_monitor(cfg: DictConfig, model: nn.Module, device: torch.device, epoch: int, runlog: RunLogger,
                    data: tuple, iteration: int = 0, train_seconds: float = 0.0) -> dict:
    """Weighted kNN of trunk features on a labelled split; optionally next to a random trunk.

    `iteration` and `train_seconds` (training time so far, evaluations excluded) go into the
    result, so that knn.json's history plots accuracy against training time. In a run of several
    processes every one calls it and extracts its share of the images; rank 0's `runlog` writes."""
    k = cfg.KNN_MONITOR
    train_set, test_set = data
    kwargs = dict(image_size=k.IMAGE_SIZE, k=k.K, temperature=k.TEMPERATURE,
                  num_workers=cfg.DATA.NUM_DATALOADER_WORKERS, amp=False)
    was_training = model.training
    # The processes share the images, so they must share the trunk: its weights are the same
    # everywhere, but each process's BatchNorm running averages saw only its own batches (DDP
    # copies rank 0's at the next forward). Rank 0's, the ones a checkpoint saves, go to all.
    distributed.copy_buffers_from_rank0(model)
    results = {"epoch": epoch, "iteration": iteration, "train_seconds": round(train_seconds, 2),
               "k": k.K, "temperature": k.TEMPERATURE}
    results["trained"] = evaluate_knn(model.trunk, train_set, test_set, **kwargs)
    if k.COMPARE_RANDOM_INIT:
        torch.manual_seed(cfg.SEED_VALUE)
        random_trunk = build_model(cfg).trunk.to(device)
        results["random_init"] = evaluate_knn(random_trunk, train_set, test_set, **kwargs)
    model.train(was_training)
    runlog.log_knn(results)
    return results
