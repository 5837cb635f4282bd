"""Every evaluation command end to end through its main() on the built-in synthetic images."""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torchvision
from torch import nn
from torchvision.transforms import functional as TF

from swav.cli import guarded
from swav.data.synthetic import SyntheticShapes
from swav.eval.commands import extract_main, knn_main, linear_main, semisup_main, svm_main
from swav.eval.features import extract_dataset
from swav.eval.knn import knn_classify

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
TINY = [  # quickstart's ResNet-18 (ImageNet stem), 32-px synthetic shapes
    "config.DATA.SYNTHETIC.NUM_IMAGES_TRAIN=40",
    "config.DATA.SYNTHETIC.NUM_IMAGES_TEST=20",
    "config.DATA.NUM_DATALOADER_WORKERS=0",
    "config.EVAL.BATCH_SIZE=16",
    "config.MACHINE.DEVICE=cpu",
]



def _args(tmp_path, *extra):
    return [*TINY, f"config.CHECKPOINT.DIR={tmp_path}", *extra]


def _torchvision_weights(tmp_path):
    tv = torchvision.models.resnet18()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-trivial BN statistics, so eval mode matters
        for name, t in tv.state_dict().items():
            if "running_var" in name:
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif "running_mean" in name:
                t.copy_(torch.rand(t.shape, generator=g) - 0.5)
    path = tmp_path / "tv_r18.pth"
    torch.save(tv.state_dict(), path)
    tv.fc = nn.Identity()
    return tv.eval(), path


def _images(split, n):
    data = SyntheticShapes(split, n, 32, 10, seed=0)
    x = torch.stack([TF.normalize(TF.to_tensor(data[i][0]), MEAN, STD) for i in range(n)])
    return x, torch.tensor(data.labels)


def test_extract_from_torchvision_weights_equals_torchvision(tmp_path):
    tv, weights = _torchvision_weights(tmp_path)
    assert extract_main(_args(tmp_path, f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE={weights}")) == 0
    saved = torch.load(tmp_path / "features" / "train_res5.torch", weights_only=True)
    x, y = _images("train", 40)
    with torch.no_grad():
        torch.testing.assert_close(saved["features"], tv(x), atol=1e-4, rtol=1e-4)
    assert torch.equal(saved["labels"], y)
    assert saved["paths"][:2] == ["synthetic:train:0", "synthetic:train:1"]
    assert (tmp_path / "features" / "test_res5.torch").is_file()
    # A lower stage on request: res3 = torchvision's layer2, average-pooled.
    assert extract_main(_args(tmp_path, f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE={weights}",
                              "config.EVAL.FEATURES.LAYER=res3", "config.EVAL.FEATURES.SPLITS=[test]")) == 0
    saved = torch.load(tmp_path / "features" / "test_res3.torch", weights_only=True)
    x, _ = _images("test", 20)
    with torch.no_grad():
        h = tv.layer2(tv.layer1(tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))))
    torch.testing.assert_close(saved["features"], h.mean((2, 3)), atol=1e-4, rtol=1e-4)


def test_knn_trained_weights_and_random_baseline(tmp_path, capsys):
    tv, weights = _torchvision_weights(tmp_path)
    assert knn_main(_args(tmp_path, f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE={weights}")) == 0
    out = json.loads((tmp_path / "knn.json").read_text())
    assert out["k"] == 200 and out["temperature"] == 0.1 and out["weights"] == str(weights)
    assert {out["top1"], out["top5"]} == {out["k200"]["top1"], out["k200"]["top5"]}
    # The same numbers from torchvision's features and knn_classify.
    (xtr, ytr), (xte, yte) = _images("train", 40), _images("test", 20)
    with torch.no_grad():
        ftr, fte = (torch.nn.functional.normalize(tv(x), dim=1) for x in (xtr, xte))
    ref = knn_classify(ftr, ytr, fte, yte, k=[20, 200], temperature=0.1, num_classes=10)
    for k in ("k20", "k200"):
        assert out[k]["top1"] == pytest.approx(ref[k]["top1"]) and out[k]["top5"] == pytest.approx(ref[k]["top5"])
    assert '"top1"' in capsys.readouterr().out  # printed too
    # Random init: the baseline every command accepts.
    assert knn_main(_args(tmp_path / "random")) == 0
    assert json.loads((tmp_path / "random" / "knn.json").read_text())["weights"] == "random init"


def test_linear_fast_and_augmented(tmp_path):
    assert linear_main(_args(tmp_path, "config.EVAL.LINEAR.NUM_EPOCHS=3")) == 0
    fast = json.loads((tmp_path / "linear.json").read_text())
    assert fast["fast"] and fast["mode"].startswith("fast") and "no augmentation" in fast["mode"]
    assert 0 <= fast["top1"] <= fast["top5"] <= 100 and fast["num_test"] == 20
    assert linear_main(_args(tmp_path, "config.EVAL.LINEAR.NUM_EPOCHS=1", "config.EVAL.LINEAR.FAST=false",
                             "config.EVAL.LINEAR.BATCH_SIZE=16", "config.EVAL.LINEAR.LR_SCHEDULE=step")) == 0
    slow = json.loads((tmp_path / "linear.json").read_text())
    assert not slow["fast"] and slow["mode"].startswith("augmented") and slow["lr_schedule"] == "step"


def test_semisup_balanced_subset_end_to_end(tmp_path):
    assert semisup_main(_args(tmp_path, "config.EVAL.SEMISUP.PERCENT=25", "config.EVAL.SEMISUP.NUM_EPOCHS=1",
                              "config.EVAL.SEMISUP.BATCH_SIZE=8", "config.EVAL.SEMISUP.HEAD_LR=0.1")) == 0
    out = json.loads((tmp_path / "semisup.json").read_text())
    assert out["num_labelled"] == 10 and out["subset"].startswith("25 % per class")  # 1 of 4 per class
    assert 0 <= out["top1"] <= out["top5"] <= 100 and np.isfinite(out["final_loss"])


def test_svm_single_and_multi_label(tmp_path):
    assert svm_main(_args(tmp_path, "config.EVAL.SVM.COSTS=[0.1,1.0]", "config.EVAL.SVM.LOW_SHOT=[2]")) == 0
    out = json.loads((tmp_path / "svm.json").read_text())
    assert not out["multi_label"] and len(out["ap_per_class"]) == 10
    assert 0 <= out["mAP"] <= 100 and 0 <= out["top1"] <= out["top5"] <= 100
    assert out["low_shot"]["k2"]["num_train"] == 20
    # Multi-label: label matrices in dataset order; here "shape class is even" and "is < 5".
    train_y, test_y = np.array(SyntheticShapes("train", 40).labels), np.array(SyntheticShapes("test", 20).labels)
    for name, y in (("train", train_y), ("test", test_y)):
        np.save(tmp_path / f"{name}.npy", np.c_[y % 2 == 0, y < 5].astype(int))
    assert svm_main(_args(tmp_path, "config.EVAL.SVM.COSTS=[1.0]", f"config.EVAL.SVM.TRAIN_LABELS={tmp_path / 'train.npy'}",
                          f"config.EVAL.SVM.TEST_LABELS={tmp_path / 'test.npy'}")) == 0
    out = json.loads((tmp_path / "svm.json").read_text())
    assert out["multi_label"] and len(out["ap_per_class"]) == 2 and "top1" not in out


def test_bad_weights_and_keys_are_config_errors(tmp_path, capsys):
    torch.save(torchvision.models.resnet34().state_dict(), tmp_path / "r34.pth")
    assert guarded(lambda: knn_main(_args(tmp_path, f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE={tmp_path / 'r34.pth'}"))) == 2
    err = capsys.readouterr().err
    assert "PARAMS_FILE" in err and "unexpected" in err and "layer1.2.conv1.weight" in err
    assert guarded(lambda: knn_main(_args(tmp_path, "config.EVAL.KNN.TEMPERATUR=0.1"))) == 2
    assert "TEMPERATURE" in capsys.readouterr().err
    assert guarded(lambda: linear_main(_args(tmp_path, "config.EVAL.FEATURES.LAYER=res6"))) == 2


TORCHRUN_RANK_1 = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
SRUN_TASK_1 = {"SLURM_PROCID": "1", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "4",
               "SLURM_STEP_NUM_TASKS": "4", "SLURM_NODEID": "0", "SLURM_JOB_ID": "7"}


@pytest.mark.parametrize(("environ", "launcher"), [(TORCHRUN_RANK_1, "torchrun"), (SRUN_TASK_1, "srun")])
@pytest.mark.parametrize("main", [knn_main, linear_main, semisup_main, svm_main])
def test_evaluations_refuse_to_run_as_several_processes(tmp_path, capsys, monkeypatch, environ, launcher, main):
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    command = main.__name__.removesuffix("_main")
    assert guarded(lambda: main(_args(tmp_path))) == 2
    err = capsys.readouterr().err
    assert f"swav {command} runs in one process, but {launcher} started" in err
    assert f"Run `swav {command} ...` as one process, without {launcher}" in err
    assert not (tmp_path / f"{command}.json").exists()


def test_one_process_under_a_launcher_is_not_refused():
    from swav.config import load_config
    from swav.eval.commands import refuse_launchers

    cfg = load_config([])
    refuse_launchers("knn", cfg, {})
    refuse_launchers("knn", cfg, {**TORCHRUN_RANK_1, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                                  "LOCAL_WORLD_SIZE": "1"})
    refuse_launchers("knn", cfg, {**SRUN_TASK_1, "SLURM_NTASKS": "1", "SLURM_STEP_NUM_TASKS": "1"})


def _extract_worker(rank: int, port: int, out_path: str, as_if_nccl: bool = False) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    if as_if_nccl:  # the gather then takes its own gloo group, as it does beside an nccl group
        import swav.eval.features as features

        real = dist.get_backend
        features.dist = type("Dist", (), {name: staticmethod(getattr(dist, name)) for name in dir(dist)
                                          if not name.startswith("_")})
        features.dist.get_backend = staticmethod(lambda group=None: "nccl" if group is None else real(group))
        made = []
        features.dist.new_group = staticmethod(lambda **kwargs: made.append(kwargs) or dist.new_group(**kwargs))
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    data = [(torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(i)), i % 3) for i in range(11)]
    result = extract_dataset(model, data, lambda t: t, batch_size=4)
    if as_if_nccl:
        assert made == [{"backend": "gloo"}]
    if rank == 0:
        torch.save(result, out_path)
    else:
        assert result is None
    dist.destroy_process_group()


@pytest.mark.parametrize("as_if_nccl", [False, True])
def test_extraction_shards_over_two_processes_and_gathers_in_order(tmp_path, as_if_nccl):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork: the workers inherit the imports (spawn would spend seconds importing torch again).
    mp.start_processes(_extract_worker, args=(port, str(tmp_path / "f.pt"), as_if_nccl), nprocs=2, start_method="fork")
    features, labels = torch.load(tmp_path / "f.pt", weights_only=True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    data = [(torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(i)), i % 3) for i in range(11)]
    single = extract_dataset(model, data, lambda t: t, batch_size=4)
    torch.testing.assert_close(features, single[0])
    assert labels.tolist() == single[1].tolist() == [i % 3 for i in range(11)]
