"""`swav extract | knn | linear | semisup | svm | export`: config in, JSON results out.

Each command composes the config exactly like `swav train` (config=NAME, config.KEY=VALUE),
builds the trunk from MODEL.TRUNK with the weights of MODEL.WEIGHTS_INIT.PARAMS_FILE (random
init when empty: the baseline), reads DATA.TRAIN / DATA.TEST, and writes its results into
CHECKPOINT.DIR (knn.json, linear.json, semisup.json, svm.json; top1/top5 in percent or mAP).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torchvision import transforms

from swav import distributed, precision
from swav.config import ConfigError, load_config
from swav.eval.features import PooledStage, dataset_labels, extract_dataset
from swav.eval.knn import EvalTransform, knn_classify
from swav.runlog import setup_logging

logger = logging.getLogger("swav")

SPLIT_KEYS = {"train": "DATA.TRAIN", "test": "DATA.TEST"}


# ----------------------------------------------------------------------------------------------
# Config -> objects, in one place
# ----------------------------------------------------------------------------------------------


def _config(command: str, argv: list[str], description: str) -> DictConfig:
    parser = argparse.ArgumentParser(prog=f"swav {command}", description=description)
    parser.add_argument("overrides", nargs="*", help="config=NAME, +config/GROUP=OPTION, config.KEY=VALUE")
    cfg = load_config(parser.parse_args(argv).overrides)
    run_dir = Path(cfg.CHECKPOINT.DIR)
    run_dir.mkdir(parents=True, exist_ok=True)
    setup_logging(run_dir / "log.txt")
    return cfg


def build_split(cfg: DictConfig, split: str):
    from swav.build import build_dataset_from

    key = SPLIT_KEYS[split]
    data = cfg.DATA.TRAIN if split == "train" else cfg.DATA.TEST
    if len(data.DATA_SOURCES) not in (1, len(data.DATA_PATHS)):
        raise ConfigError(f"config.{key}.DATA_SOURCES needs one source per DATA_PATHS entry")
    return build_dataset_from(cfg, data.DATA_SOURCES, data.DATA_PATHS, data.DATA_LIMIT, key=key)


def build_eval_trunk(cfg: DictConfig) -> tuple[torch.nn.Module, str]:
    """The trunk with its weights, and a description of where they came from."""
    from swav.build import build_trunk
    from swav.weights import load_trunk_weights

    torch.manual_seed(cfg.SEED_VALUE)  # the random-init baseline is reproducible
    trunk = build_trunk(cfg)
    path = cfg.MODEL.WEIGHTS_INIT.PARAMS_FILE
    if not path:
        logger.info("config.MODEL.WEIGHTS_INIT.PARAMS_FILE is empty: random-init trunk (the baseline)")
        return trunk, "random init"
    try:
        load_trunk_weights(trunk, path, trust_pickle=bool(cfg.MODEL.WEIGHTS_INIT.TRUST_PICKLE))
    except ValueError as e:  # a file that does not fit, or a pickle refused as unsafe
        raise ConfigError(f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE: {e}") from None
    return trunk, str(path)


def _device(cfg: DictConfig) -> torch.device:
    from swav.build import select_device

    return select_device(cfg)


def eval_transform(cfg: DictConfig) -> EvalTransform:
    return EvalTransform(cfg.EVAL.IMAGE_SIZE, list(cfg.EVAL.MEAN), list(cfg.EVAL.STD))


def train_transform(cfg: DictConfig):
    """The paper's training augmentation for linear and semi-supervised: RandomResizedCrop
    (default scale and ratio) and horizontal flip."""
    return transforms.Compose([
        transforms.RandomResizedCrop(cfg.EVAL.IMAGE_SIZE),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(list(cfg.EVAL.MEAN), list(cfg.EVAL.STD)),
    ])


def feature_module(cfg: DictConfig, trunk: torch.nn.Module) -> PooledStage:
    f = cfg.EVAL.FEATURES
    if f.LAYER != "res5" and not hasattr(trunk, "forward_stages"):
        raise ConfigError(f"config.EVAL.FEATURES.LAYER={f.LAYER}: this trunk only gives res5 features")
    try:
        return PooledStage(trunk, f.LAYER, f.POOL_SIZE)
    except ValueError as e:
        raise ConfigError(f"config.EVAL.FEATURES: {e}") from None


def _eval_amp(cfg: DictConfig, device) -> torch.dtype | None:
    """EVAL.AMP's autocast dtype by the rule of training (swav.precision): bfloat16, float16 on a
    GPU without bfloat16, none on a CPU that would emulate bfloat16."""
    return precision.autocast_dtype(
        cfg.EVAL.AMP, torch.device(device), "bfloat16", cfg.MODEL.AMP_PARAMS.CPU_BFLOAT16
    )


def split_features(cfg: DictConfig, model, dataset, device, desc: str):
    """Features and labels of a whole split with the centre-crop transform (rank 0 gets them)."""
    return extract_dataset(
        model, dataset, eval_transform(cfg), batch_size=cfg.EVAL.BATCH_SIZE,
        num_workers=cfg.DATA.NUM_DATALOADER_WORKERS, device=device, amp=_eval_amp(cfg, device), desc=desc,
    )


def _require_labels(labels: torch.Tensor, split: str) -> None:
    if len(labels) and int(labels.min()) < 0:
        raise ConfigError(
            f"config.{SPLIT_KEYS[split]}: some images have no label; give class sub-folders or a "
            "`path label` file list"
        )


def _finite(value):
    """NaN (e.g. the AP of a class without test positives) becomes null: JSON has no NaN."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def write_results(cfg: DictConfig, name: str, results: dict) -> dict:
    results = _finite(results)
    path = Path(cfg.CHECKPOINT.DIR) / f"{name}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    logger.info("results written to %s", path)
    return results


def _common(cfg: DictConfig, command: str, weights: str, seconds: float) -> dict:
    return {
        "command": command,
        "weights": weights,
        "trunk": f"resnet{cfg.MODEL.TRUNK.RESNETS.DEPTH}" if cfg.MODEL.TRUNK.NAME == "resnet" else cfg.MODEL.TRUNK.NAME,
        "layer": cfg.EVAL.FEATURES.LAYER,
        "image_size": cfg.EVAL.IMAGE_SIZE,
        "train_data": list(cfg.DATA.TRAIN.DATA_PATHS),
        "test_data": list(cfg.DATA.TEST.DATA_PATHS),
        "seconds": round(seconds, 1),
    }


@torch.no_grad()
def _output_width(module: torch.nn.Module, cfg: DictConfig, device) -> int:
    """Features per image, from a forward pass in eval mode (no BN statistics touched)."""
    was_training = module.training
    module.eval()
    size = cfg.EVAL.IMAGE_SIZE
    width = module(torch.zeros(1, 3, size, size, device=device)).flatten(1).shape[1]
    module.train(was_training)
    return width


def _num_classes(*labels: torch.Tensor) -> int:
    return int(max(int(x.max()) for x in labels if len(x))) + 1


# ----------------------------------------------------------------------------------------------
# The commands: run_* take a resolved config and return the results; *_main parse argv
# ----------------------------------------------------------------------------------------------


def run_extract(cfg: DictConfig) -> dict:
    start = time.perf_counter()
    device = _device(cfg)
    trunk, weights = build_eval_trunk(cfg)
    model = feature_module(cfg, trunk).to(device)
    out_dir = Path(cfg.CHECKPOINT.DIR) / "features"
    written = {}
    for split in cfg.EVAL.FEATURES.SPLITS:
        if split not in SPLIT_KEYS:
            raise ConfigError(f"config.EVAL.FEATURES.SPLITS: {split!r} is not train or test")
        dataset = build_split(cfg, split)
        result = split_features(cfg, model, dataset, device, desc=f"extract {split}")
        if result is None:  # not rank 0
            continue
        features, labels = result
        path = out_dir / f"{split}_{cfg.EVAL.FEATURES.LAYER}.torch"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"features": features, "labels": labels,
                    "paths": [dataset.path(i) for i in range(len(dataset))],
                    "layer": cfg.EVAL.FEATURES.LAYER, "pool_size": cfg.EVAL.FEATURES.POOL_SIZE,
                    "image_size": cfg.EVAL.IMAGE_SIZE, "weights": weights}, path)
        written[split] = {"path": str(path), "shape": list(features.shape)}
        logger.info("%s features %s -> %s", split, tuple(features.shape), path)
    return {**_common(cfg, "extract", weights, time.perf_counter() - start), "files": written}


def run_knn(cfg: DictConfig) -> dict:
    start = time.perf_counter()
    device = _device(cfg)
    trunk, weights = build_eval_trunk(cfg)
    model = feature_module(cfg, trunk).to(device)
    train_f, train_y = split_features(cfg, model, build_split(cfg, "train"), device, "features train")
    test_f, test_y = split_features(cfg, model, build_split(cfg, "test"), device, "features test")
    _require_labels(train_y, "train")
    _require_labels(test_y, "test")
    ks = sorted({int(k) for k in cfg.EVAL.KNN.K})
    per_k = knn_classify(
        torch.nn.functional.normalize(train_f, dim=1).to(device), train_y,
        torch.nn.functional.normalize(test_f, dim=1), test_y,
        k=ks, temperature=cfg.EVAL.KNN.TEMPERATURE, num_classes=_num_classes(train_y, test_y),
    )
    headline = per_k[f"k{ks[-1]}"]
    return {
        **headline, "k": ks[-1], "temperature": cfg.EVAL.KNN.TEMPERATURE, **per_k,
        "num_train": len(train_y), "num_test": len(test_y),
        **_common(cfg, "knn", weights, time.perf_counter() - start),
    }


def _augmented_batches(cfg: DictConfig, model, dataset, device, seed: int):
    """(features, labels) of freshly augmented training images through the frozen trunk."""
    from torch.utils.data import DataLoader

    from swav.eval.features import Transformed

    loader = DataLoader(
        Transformed(dataset, train_transform(cfg)), batch_size=cfg.EVAL.LINEAR.BATCH_SIZE, shuffle=True,
        drop_last=len(dataset) % cfg.EVAL.LINEAR.BATCH_SIZE == 1,  # a lone last image would break a BN head
        num_workers=cfg.DATA.NUM_DATALOADER_WORKERS, generator=torch.Generator().manual_seed(seed),
        pin_memory=device.type == "cuda",
    )

    def batches(epoch: int):
        model.eval()  # BN statistics frozen
        for images, labels, _ in loader:
            with torch.no_grad():
                features = model(images.to(device)).float().flatten(1)
            yield features, labels.to(device)

    return loader, batches


def run_linear(cfg: DictConfig) -> dict:
    from swav.eval.linear import (
        fit_linear,
        linear_lr_schedule,
        new_linear,
        topk_accuracy,
        train_linear_on_features,
    )

    start = time.perf_counter()
    lin = cfg.EVAL.LINEAR
    if lin.LR_SCHEDULE not in ("cosine", "step"):
        raise ConfigError(f"config.EVAL.LINEAR.LR_SCHEDULE={lin.LR_SCHEDULE!r}: use cosine or step")
    device = _device(cfg)
    trunk, weights = build_eval_trunk(cfg)
    model = feature_module(cfg, trunk).to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    train_set, test_set = build_split(cfg, "train"), build_split(cfg, "test")
    test_f, test_y = split_features(cfg, model, test_set, device, "features test")
    _require_labels(test_y, "test")
    train_labels = torch.from_numpy(dataset_labels(train_set))
    _require_labels(train_labels, "train")
    num_classes = _num_classes(train_labels, test_y)
    if lin.FAST:
        mode = "fast: linear layer on precomputed centre-crop features, no augmentation (not the paper's protocol)"
        logger.info("linear: %s", mode)
        train_f, train_y = split_features(cfg, model, train_set, device, "features train")
        head = train_linear_on_features(
            train_f.to(device), train_y.to(device), num_classes, lin.NUM_EPOCHS, lin.BATCH_SIZE, lin.LR,
            lin.LR_SCHEDULE, lin.STEP_DECAYS, lin.WEIGHT_DECAY, lin.MOMENTUM, seed=cfg.SEED_VALUE, use_bn=lin.USE_BN,
        )
    else:
        mode = "augmented: RandomResizedCrop + flip through the frozen trunk every epoch (paper protocol)"
        logger.info("linear: %s", mode)
        torch.manual_seed(cfg.SEED_VALUE)
        head = new_linear(_output_width(model, cfg, device), num_classes, lin.USE_BN).to(device)
        loader, batches = _augmented_batches(cfg, model, train_set, device, cfg.SEED_VALUE)
        schedule = linear_lr_schedule(lin.LR_SCHEDULE, lin.LR, lin.NUM_EPOCHS, len(loader), lin.STEP_DECAYS)
        fit_linear(head, batches, lin.NUM_EPOCHS, len(loader), schedule, lin.WEIGHT_DECAY, lin.MOMENTUM,
                   desc="linear (augmented)")
        head.eval()
    with torch.no_grad():
        accuracy = topk_accuracy(head(test_f.to(device)).cpu(), test_y)
    return {
        **accuracy, "mode": mode, "fast": bool(lin.FAST), "epochs": lin.NUM_EPOCHS, "lr": lin.LR,
        "lr_schedule": lin.LR_SCHEDULE, "weight_decay": lin.WEIGHT_DECAY, "batch_size": lin.BATCH_SIZE, "use_bn": lin.USE_BN,
        "num_train": len(train_labels), "num_test": len(test_y),
        **_common(cfg, "linear", weights, time.perf_counter() - start),
    }


def run_semisup(cfg: DictConfig) -> dict:
    from swav.eval.linear import new_linear, topk_accuracy
    from swav.eval.semisup import Classifier, balanced_subset, finetune, subset_from_file

    start = time.perf_counter()
    s = cfg.EVAL.SEMISUP
    device = _device(cfg)
    trunk, weights = build_eval_trunk(cfg)
    train_set, test_set = build_split(cfg, "train"), build_split(cfg, "test")
    labels = dataset_labels(train_set)
    try:
        if s.SUBSET_FILE:
            indices = subset_from_file([train_set.path(i) for i in range(len(train_set))], s.SUBSET_FILE)
            subset = f"file {s.SUBSET_FILE}"
        else:
            indices = balanced_subset(labels, s.PERCENT, cfg.SEED_VALUE)
            subset = f"{s.PERCENT:g} % per class, seed {cfg.SEED_VALUE}"
    except ValueError as e:
        raise ConfigError(f"config.EVAL.SEMISUP: {e}") from None
    _require_labels(torch.from_numpy(labels[indices]), "train")
    num_classes = int(labels.max()) + 1
    logger.info("semi-supervised: %d labelled images (%s) of %d", len(indices), subset, len(train_set))
    torch.manual_seed(cfg.SEED_VALUE)
    model = Classifier(trunk, new_linear(_output_width(trunk, cfg, "cpu"), num_classes)).to(device)
    history = finetune(
        model, train_set, indices, train_transform(cfg), s.NUM_EPOCHS, s.BATCH_SIZE, s.TRUNK_LR, s.HEAD_LR,
        list(s.LR_MILESTONES), s.LR_GAMMA, s.MOMENTUM, s.WEIGHT_DECAY, cfg.DATA.NUM_DATALOADER_WORKERS,
        device, cfg.SEED_VALUE,
    )
    logits, test_y = split_features(cfg, model, test_set, device, "test")
    _require_labels(test_y, "test")
    return {
        **topk_accuracy(logits, test_y), "subset": subset, "num_labelled": len(indices),
        "epochs": s.NUM_EPOCHS, "trunk_lr": s.TRUNK_LR, "head_lr": s.HEAD_LR, "final_loss": history[-1] if history else None,
        "num_test": len(test_y), **_common(cfg, "semisup", weights, time.perf_counter() - start),
    }


def _svm_targets(cfg: DictConfig, labels: torch.Tensor, file: str, split: str, num_classes: int | None):
    from swav.eval.svm import load_label_matrix, one_hot

    try:
        if file:
            return load_label_matrix(file, len(labels)), True
        _require_labels(labels, split)
        return one_hot(labels.numpy(), num_classes), False
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"config.EVAL.SVM ({split}): {e}") from None


def run_svm(cfg: DictConfig) -> dict:
    from swav.eval.linear import topk_accuracy
    from swav.eval.svm import low_shot_rows, mean_ap, svm_scores, train_svms

    start = time.perf_counter()
    s = cfg.EVAL.SVM
    device = _device(cfg)
    trunk, weights = build_eval_trunk(cfg)
    model = feature_module(cfg, trunk).to(device)
    train_f, train_y = split_features(cfg, model, build_split(cfg, "train"), device, "features train")
    test_f, test_y = split_features(cfg, model, build_split(cfg, "test"), device, "features test")
    num_classes = None if s.TRAIN_LABELS else _num_classes(train_y, test_y)
    train_t, multi = _svm_targets(cfg, train_y, s.TRAIN_LABELS, "train", num_classes)
    test_t, _ = _svm_targets(cfg, test_y, s.TEST_LABELS, "test", train_t.shape[1])
    if train_t.shape[1] != test_t.shape[1]:
        raise ConfigError(f"config.EVAL.SVM: {train_t.shape[1]} training classes but {test_t.shape[1]} test classes")
    costs = [float(c) for c in s.COSTS]
    if not costs or min(costs) <= 0:
        raise ConfigError("config.EVAL.SVM.COSTS: give one or more positive costs")
    x_train, x_test = train_f.numpy(), test_f.numpy()

    def evaluate(rows: np.ndarray) -> dict:
        w, b, chosen = train_svms(x_train[rows], train_t[rows], costs, s.CV_FOLDS, s.MAX_ITER, cfg.SEED_VALUE)
        scores = svm_scores(x_test, w, b)
        m, aps = mean_ap(scores, test_t)
        out = {"mAP": m, "ap_per_class": [100.0 * a for a in aps], "costs": chosen, "num_train": int(len(rows))}
        if not multi:
            out.update(topk_accuracy(torch.from_numpy(scores), test_y))
        return out

    results = evaluate(np.arange(len(x_train)))
    results["multi_label"] = multi
    if s.LOW_SHOT:
        results["low_shot"] = {}
        for k in s.LOW_SHOT:
            rows = low_shot_rows(train_t, int(k), cfg.SEED_VALUE)
            logger.info("low-shot SVM: %d positives per class, %d training images", k, len(rows))
            results["low_shot"][f"k{k}"] = evaluate(rows)
    return {**results, **_common(cfg, "svm", weights, time.perf_counter() - start)}


def extract_main(argv: list[str]) -> int:
    """`swav extract`: pooled trunk features (+ labels and paths) of DATA.TRAIN / DATA.TEST."""
    cfg = _config("extract", argv, "Save trunk features of DATA.TRAIN and DATA.TEST to CHECKPOINT.DIR/features/.")
    _join_launcher_group(cfg)
    try:
        results = run_extract(cfg)
    finally:
        if dist.is_initialized():  # leave the launcher's group cleanly (nccl warns otherwise)
            dist.destroy_process_group()
    if results["files"]:  # rank 0
        print(json.dumps(results, indent=2))
    return 0


def _join_launcher_group(cfg: DictConfig) -> None:
    """Under torchrun or srun, join their process group so extraction is split over the ranks."""
    from swav.launch import join

    env = distributed.launch_plan(cfg, os.environ)
    if env is None or env.world_size == 1:
        return
    join(cfg, env)
    logger.info("extract: rank %d of %d", env.rank, env.world_size)


def refuse_launchers(command: str, cfg: DictConfig, environ: Mapping[str, str] = os.environ) -> None:
    """ConfigError when torchrun or a multi-task srun step started this command several times.

    Only `swav extract` splits its work over processes. The other commands join no process group:
    every copy would evaluate the whole data set on the same GPU and write the same JSON file.
    """
    env = distributed.launch_plan(cfg, environ)
    if env is None or env.world_size == 1:
        return
    launcher = "torchrun" if env.launcher == "torchrun" else "srun"
    raise ConfigError(
        f"swav {command} runs in one process, but {launcher} started {env.world_size}: each would "
        f"evaluate on the same device and write the same {command}.json. Run `swav {command} ...` "
        f"as one process, without {launcher}" + (" (or with srun --ntasks=1)" if launcher == "srun" else "")
    )


def _evaluate(command: str, argv: list[str], description: str, run) -> int:
    cfg = _config(command, argv, description)
    refuse_launchers(command, cfg)
    write_results(cfg, command, run(cfg))
    return 0


def knn_main(argv: list[str]) -> int:
    """`swav knn`: weighted kNN (paper table 7) -> CHECKPOINT.DIR/knn.json."""
    return _evaluate("knn", argv, "Weighted kNN of trunk features.", run_knn)


def linear_main(argv: list[str]) -> int:
    """`swav linear`: linear classifier on frozen features (A.3 / A.5) -> linear.json."""
    return _evaluate("linear", argv, "Linear probe on the frozen trunk.", run_linear)


def semisup_main(argv: list[str]) -> int:
    """`swav semisup`: fine-tuning on 1 % / 10 % of the labels (A.4) -> semisup.json."""
    return _evaluate("semisup", argv, "Semi-supervised fine-tuning.", run_semisup)


def svm_main(argv: list[str]) -> int:
    """`swav svm`: per-class linear SVMs (A.5, VOC07) -> svm.json."""
    return _evaluate("svm", argv, "Linear SVMs on frozen features.", run_svm)


def export_main(argv: list[str]) -> int:
    """`swav export WEIGHTS OUTPUT [--trust-pickle]`: the trunk as a plain torchvision-style state dict."""
    from swav.weights import export_trunk

    parser = argparse.ArgumentParser(
        prog="swav export",
        description="Write the trunk of a checkpoint (ours, official SwAV, VISSL, torchvision) as a plain "
        "state dict with torchvision ResNet names (.torch / .pth / .pt / .safetensors).",
    )
    parser.add_argument("checkpoint", help="e.g. checkpoints/quickstart/model_final_checkpoint.torch")
    parser.add_argument("output", help="e.g. trunk.pth")
    parser.add_argument(
        "--trust-pickle", action="store_true",
        help="load a legacy checkpoint whose pickle holds Python objects besides tensors; loading "
        "it can run any code from the file on this machine, so only for files you trust",
    )
    args = parser.parse_args(argv)
    setup_logging()
    try:
        info = export_trunk(args.checkpoint, args.output, trust_pickle=args.trust_pickle)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    print(json.dumps(info, indent=2))
    return 0
