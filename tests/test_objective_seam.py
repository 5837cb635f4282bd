"""The objective seam: a method defined outside the package trains through swav.train unchanged."""

from __future__ import annotations

import pytest
import torch
from test_train import tiny

from swav import build
from swav.config import ConfigError
from swav.losses import Objective, StepOutputs
from swav.train import train


class PullCropsTogether(Objective):
    """A toy method: every crop's embedding moves towards the mean embedding of its image."""

    def __init__(self, num_crops: int) -> None:
        super().__init__()
        self.num_crops = num_crops
        self.seen: list[torch.Tensor] = []
        self.epochs: list[int] = []
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))  # per-rank state, checkpointed

    def step(self, outputs: StepOutputs, iteration: int) -> torch.Tensor:
        self.seen.append(outputs.indices.clone())
        self.steps += 1
        z = outputs.embeddings.view(self.num_crops, -1, outputs.embeddings.shape[1])
        return (z - z.mean(dim=0, keepdim=True)).pow(2).sum(dim=2).mean()

    def start_epoch(self, epoch: int, context=None) -> None:
        self.epochs.append(epoch)


def test_a_toy_objective_trains_through_the_loop(tmp_path, monkeypatch):
    made = []

    def build_toy(cfg):
        # A method from outside has no LOSS section: it reads its shapes from the data section.
        made.append(PullCropsTogether(cfg.DATA.TRAIN.TRANSFORMS[0].total_num_crops))
        return made[-1]

    monkeypatch.setitem(build.OBJECTIVES, "pull_crops_together", build_toy)
    result = train(tiny(tmp_path, "config.LOSS.name=pull_crops_together", "config.OPTIMIZER.num_epochs=1",
                        "config.DATA.SYNTHETIC.NUM_IMAGES_TRAIN=16"))
    toy = made[-1]
    assert result["iteration"] == 2 and int(toy.steps) == 2
    assert toy.epochs == [0]
    # The step saw the batch's image indices: two batches of 8 covering the 16 images once.
    assert sorted(torch.cat(toy.seen).tolist()) == list(range(16))
    state = torch.load(tmp_path / "checkpoint.torch", weights_only=True)
    assert int(state["loss_per_rank"][0]["steps"]) == 2


def test_an_unknown_method_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="config.LOSS.name='no_such_loss' is not available; use one of swav_loss"):
        train(tiny(tmp_path, "config.LOSS.name=no_such_loss"))
    assert not (tmp_path / "train_config.yaml").exists()
