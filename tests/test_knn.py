"""Weighted kNN: votes against a float64 loop reference, top-5, chunking, features, transforms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_kmeans import _join_gloo, run_two_processes
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchvision import transforms

from swav.eval.knn import EvalTransform, evaluate_knn, extract_features, knn_classify


def _reference_scores(train_f, train_y, test_f, k, temperature, num_classes) -> np.ndarray:
    """Class scores per test sample, straight from the formula, in float64 with plain loops."""
    train_f = np.asarray(train_f, dtype=np.float64)
    test_f = np.asarray(test_f, dtype=np.float64)
    scores = np.zeros((len(test_f), num_classes))
    for i, q in enumerate(test_f):
        sims = train_f @ q
        order = np.argsort(-sims, kind="stable")
        if k < len(order):
            # float32 may order near-ties differently: the test data must not depend on that.
            if sims[order[k - 1]] - sims[order[k]] < 1e-6:
                near = np.abs(sims - sims[order[k - 1]]) < 1e-6
                assert len(set(np.asarray(train_y)[near].tolist())) == 1
        order = order[:k]
        for j in order:
            scores[i, int(train_y[j])] += math.exp(sims[j] / temperature)
    return scores


def _reference_accuracy(scores: np.ndarray, labels) -> tuple[float, float]:
    labels = np.asarray(labels)
    top1 = (scores.argmax(1) == labels).mean() * 100
    # Rank of the true class = number of classes with a strictly larger score.
    rank = (scores > scores[np.arange(len(labels)), labels][:, None]).sum(1)
    voted = scores[np.arange(len(labels)), labels] > 0
    top5 = ((rank < 5) & voted).mean() * 100
    return top1, top5


def _unit(angles_deg) -> torch.Tensor:
    a = torch.tensor(angles_deg, dtype=torch.float64) * math.pi / 180
    return torch.stack([a.cos(), a.sin()], 1).float()


def _random_problem(seed=5, num_train=300, num_test=70, dim=16, num_classes=8):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=g)
    train_y = torch.randint(num_classes, (num_train,), generator=g)
    test_y = torch.randint(num_classes, (num_test,), generator=g)
    train_f = F.normalize(centres[train_y] + 2.5 * torch.randn(num_train, dim, generator=g), dim=1)
    test_f = F.normalize(centres[test_y] + 2.5 * torch.randn(num_test, dim, generator=g), dim=1)
    return train_f, train_y, test_f, test_y


def test_weighting_beats_majority_vote_by_hand():
    # One class-0 neighbour at similarity 1, two class-1 neighbours at cos(60 deg) = 0.5.
    train_f = _unit([0.0, 60.0, -60.0, 180.0])
    train_y = torch.tensor([0, 1, 1, 2])
    test_f, test_y0, test_y1 = _unit([0.0]), torch.tensor([0]), torch.tensor([1])
    # T = 0.1: class 0 gets e^10 = 22026, class 1 gets 2 e^5 = 297 -> class 0.
    assert math.exp(1 / 0.1) > 2 * math.exp(0.5 / 0.1)
    assert knn_classify(train_f, train_y, test_f, test_y0, k=3, temperature=0.1)["top1"] == 100.0
    # T = 10: weights e^0.1 vs 2 e^0.05, almost a plain vote -> the majority class 1.
    assert math.exp(1 / 10) < 2 * math.exp(0.5 / 10)
    assert knn_classify(train_f, train_y, test_f, test_y1, k=3, temperature=10.0)["top1"] == 100.0
    # k = 1: only the nearest neighbour votes, at any temperature.
    assert knn_classify(train_f, train_y, test_f, test_y0, k=1, temperature=10.0)["top1"] == 100.0


def test_hand_made_set_matches_float64_reference():
    train_f = _unit([0, 10, 25, 50, 95, 120, 170, 200, 260, 300, 330, 350])
    train_y = torch.tensor([0, 1, 1, 0, 2, 2, 3, 3, 4, 4, 1, 0])
    test_f = _unit([4, 40, 100, 187, 283, 338, 17, 63])
    for k, t in [(1, 0.1), (3, 0.1), (5, 0.05), (5, 1.0), (12, 0.2)]:
        scores = _reference_scores(train_f, train_y, test_f, k, t, 5)
        top2 = np.sort(scores, axis=1)[:, -2:]
        assert (top2[:, 1] > top2[:, 0] * (1 + 1e-6)).all()  # no tie for the winning class
        test_y = torch.from_numpy(scores.argmax(1))
        assert knn_classify(train_f, train_y, test_f, test_y, k=k, temperature=t)["top1"] == 100.0
        wrong = (test_y + 1) % 5
        assert knn_classify(train_f, train_y, test_f, wrong, k=k, temperature=t)["top1"] == 0.0


@pytest.mark.parametrize(
    "k, temperature", [(1, 0.1), (10, 0.1), (50, 0.07), (200, 0.1), (300, 0.5)]
)
def test_top1_top5_match_reference(k, temperature):
    train_f, train_y, test_f, test_y = _random_problem()
    scores = _reference_scores(train_f, train_y, test_f, k, temperature, 8)
    top1, top5 = _reference_accuracy(scores, test_y)
    out = knn_classify(train_f, train_y, test_f, test_y, k=k, temperature=temperature)
    assert set(out) == {"top1", "top5"}
    assert out["top1"] == pytest.approx(top1)
    assert out["top5"] == pytest.approx(top5)
    assert 0 < out["top1"] < 100 and out["top5"] < 100  # neither trivial nor hopeless
    if k > 1:
        assert out["top1"] < out["top5"]


def test_chunking_and_multiple_k_agree():
    train_f, train_y, test_f, test_y = _random_problem(seed=1)
    whole = knn_classify(train_f, train_y, test_f, test_y, k=(5, 20, 200), batch_size=10_000)
    assert set(whole) == {"k5", "k20", "k200"}
    for batch_size in (1, 7, 64):
        chunked = knn_classify(
            train_f, train_y, test_f, test_y, k=(5, 20, 200), batch_size=batch_size
        )
        assert chunked == whole
    for k in (5, 20, 200):
        assert knn_classify(train_f, train_y, test_f, test_y, k=k) == whole[f"k{k}"]


def test_k_larger_than_train_set_is_capped():
    train_f, train_y, test_f, test_y = _random_problem(num_train=30)
    assert knn_classify(train_f, train_y, test_f, test_y, k=500) == knn_classify(
        train_f, train_y, test_f, test_y, k=30
    )


def test_tiny_temperature_stays_finite_and_tends_to_1nn():
    train_f, train_y, test_f, test_y = _random_problem(seed=2)
    # exp(1 / 1e-4) overflows even float64; shifting by the top similarity must avoid it.
    tiny = knn_classify(train_f, train_y, test_f, test_y, k=50, temperature=1e-4)
    nearest = knn_classify(train_f, train_y, test_f, test_y, k=1)
    assert tiny["top1"] == nearest["top1"]
    assert tiny["top5"] >= tiny["top1"]


def test_few_classes_top5_counts_voted_classes_and_num_classes_padding():
    train_f, train_y, test_f, test_y = _random_problem(num_classes=3)
    out = knn_classify(train_f, train_y, test_f, test_y, k=200)
    assert out["top5"] == 100.0  # with 200 neighbours every class gets votes
    nearest = knn_classify(train_f, train_y, test_f, test_y, k=1)
    assert nearest["top5"] == nearest["top1"] < 100.0  # one vote: no second guess
    padded = knn_classify(train_f, train_y, test_f, test_y, k=200, num_classes=10)
    assert padded == out  # empty extra classes change nothing


def test_invalid_arguments():
    train_f, train_y, test_f, test_y = _random_problem(num_train=10, num_test=5)
    with pytest.raises(ValueError):
        knn_classify(train_f, train_y, test_f, test_y, k=0)
    with pytest.raises(ValueError):
        knn_classify(train_f, train_y, test_f, test_y, temperature=0.0)
    with pytest.raises(ValueError):
        knn_classify(train_f[:0], train_y[:0], test_f, test_y)


def _bn_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.BatchNorm1d(6))
    with torch.no_grad():
        model[2].running_mean.uniform_(-1, 1)
        model[2].running_var.uniform_(0.5, 2)
    return model


def test_extract_features_eval_mode_normalised_and_restores_mode():
    model = _bn_model().train()
    images = torch.randn(10, 3, 2, 2)
    labels = torch.arange(10)
    extra = torch.zeros(10)  # batches may carry more than (images, labels)
    loader = DataLoader(TensorDataset(images, labels, extra), batch_size=4)
    feats, labs = extract_features(model, loader)
    assert model.training  # mode restored
    model.eval()
    with torch.no_grad():
        expected = F.normalize(model(images), dim=1)
    assert feats.dtype == torch.float32 and feats.shape == (10, 6)
    torch.testing.assert_close(feats, expected)
    assert torch.equal(labs, labels) and labs.dtype == torch.long
    raw, _ = extract_features(model, loader, normalize=False)
    torch.testing.assert_close(raw, model(images).detach())


def test_extract_features_amp_is_float32_and_close():
    model = _bn_model().eval()
    loader = DataLoader(TensorDataset(torch.randn(8, 3, 2, 2), torch.arange(8)), batch_size=8)
    full, _ = extract_features(model, loader)
    half, _ = extract_features(model, loader, amp=True)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, full, atol=0.05, rtol=0.05)


def test_eval_transform_sizes():
    t = EvalTransform(32)
    rng = np.random.default_rng(0)
    for w, h in [(32, 32), (40, 48), (20, 24), (33, 32)]:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        out = t(img)
        assert out.shape == (3, 32, 32)
        if (w, h) == (32, 32):
            expected = transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))(
                transforms.functional.to_tensor(img)
            )
            torch.testing.assert_close(out, expected)
        if (w, h) == (40, 48):  # larger: resize the short side to 32 / 0.875 = 36, centre crop
            ref = transforms.CenterCrop(32)(transforms.Resize(36)(img))
            torch.testing.assert_close(out, t.to_tensor(ref))
    grey = Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8))
    assert t(grey).shape == (3, 32, 32)


class _ColourDataset:
    """Class = which channel is bright; an average-pool trunk separates it perfectly."""

    def __init__(self, n: int, size: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.labels = [i % 3 for i in range(n)]
        self.images = []
        for label in self.labels:
            a = rng.integers(0, 80, (size, size, 3), dtype=np.uint8)
            a[..., label] += 150
            self.images.append(Image.fromarray(a))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


def test_evaluate_knn_end_to_end():
    trunk = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    train, test = _ColourDataset(30, 40, seed=0), _ColourDataset(12, 40, seed=1)
    out = evaluate_knn(trunk, train, test, image_size=32, batch_size=8, k=(5, 30))
    assert out["k5"]["top1"] == 100.0 and out["k5"]["top5"] == 100.0
    # Against a random trunk the same call runs and returns a plain dict for an int k.
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    assert set(evaluate_knn(conv, train, test, image_size=32, k=5)) == {"top1", "top5"}


def test_evaluate_knn_refuses_unlabelled_images():

    from swav.eval.knn import evaluate_knn

    class Unlabelled:
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return Image.new("RGB", (8, 8), (i * 40, 0, 0)), -1

    trunk = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
    with pytest.raises(ValueError, match="labelled images"):
        evaluate_knn(trunk, Unlabelled(), Unlabelled(), image_size=8, k=2)


def _images(n: int, seed: int) -> list[tuple[Image.Image, int]]:
    rng = np.random.default_rng(seed)
    return [(Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)), int(i % 3)) for i in range(n)]


def _trunk() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def _sharded_knn_worker(rank: int, port: int, out_dir: str) -> None:
    _join_gloo(rank, port)
    try:
        result = evaluate_knn(_trunk(), _images(21, 0), _images(11, 1), image_size=8, batch_size=4, k=[1, 5, 15])
        torch.save(result, f"{out_dir}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_two_processes_share_the_knn_work_and_get_one_process_result(tmp_path):
    # 21 training images: shares of 11 and 10, fewer than k=15, so the merge pads and re-ranks.
    run_two_processes(_sharded_knn_worker, (str(tmp_path),))
    alone = evaluate_knn(_trunk(), _images(21, 0), _images(11, 1), image_size=8, batch_size=4, k=[1, 5, 15])
    for rank in range(2):
        assert torch.load(tmp_path / f"rank{rank}.pt") == alone
    assert len({alone[f"k{k}"]["top1"] for k in (1, 5, 15)}) > 1  # the k values see different neighbours


def test_shard_ranges_cover_every_item_once_in_order():
    from swav.distributed import shard_range

    for n, world in [(21, 2), (5, 8), (64, 4), (0, 3)]:
        shares = [shard_range(n, r, world) for r in range(world)]
        assert [i for share in shares for i in share] == list(range(n))
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
