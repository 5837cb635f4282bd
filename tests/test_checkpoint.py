"""What a checkpoint holds: CPU tensors only, so that a plain `torch.load` reads it on any machine.

Without a GPU the tensors of a CPU run are on the CPU already; the tests see that every tensor
went through `.cpu()` instead. The round trip from a real GPU is in test_cuda.py.
"""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

from swav import checkpoint


def test_to_cpu_keeps_the_structure_and_every_value():
    state = OrderedDict(w=torch.arange(3.0), n=torch.tensor(2))
    state._metadata = {"": {"version": 2}}
    nested = {"model": state, "groups": [{"lr": 0.1, "params": [0, 1]}], "pair": (torch.ones(2), "x"),
              "scale": 1024.0, "none": None}
    out = checkpoint.to_cpu(nested)
    assert out.keys() == nested.keys()
    assert isinstance(out["model"], OrderedDict) and out["model"]._metadata == {"": {"version": 2}}
    assert list(out["model"]) == ["w", "n"]
    torch.testing.assert_close(out["model"]["w"], torch.arange(3.0))
    assert out["groups"] == [{"lr": 0.1, "params": [0, 1]}]
    assert isinstance(out["pair"], tuple) and out["pair"][1] == "x"
    assert (out["scale"], out["none"]) == (1024.0, None)
    assert all(t.device.type == "cpu" for t in (out["model"]["w"], out["model"]["n"], out["pair"][0]))


@pytest.fixture
def copied_tensors(monkeypatch) -> set[int]:
    """Ids of the tensors `.cpu()` returned: a stand-in for copies off a GPU."""
    made: set[int] = set()
    alive: list[torch.Tensor] = []  # so that no id is reused by another tensor
    real = torch.Tensor.cpu

    def cpu(self, *args, **kwargs):
        out = real(self, *args, **kwargs).clone()
        made.add(id(out))
        alive.append(out)
        return out

    monkeypatch.setattr(torch.Tensor, "cpu", cpu)
    return made


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def test_training_and_final_states_hold_only_tensors_copied_to_the_cpu(copied_tensors):
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(5, 3)).sum().backward()
    optimizer.step()  # momentum buffers: optimizer tensors
    objective = [{"queue": torch.zeros(2, 4)}, {"queue": torch.ones(2, 4)}]
    state = checkpoint.training_state(
        model, optimizer, objective, world_size=2, scaler=None, iteration=1, epoch=0, position=5,
        train_seconds=1.0, lr_restart=None, config_yaml="",
    )
    final = checkpoint.final_state(model, 1, "")
    for part in (state["model"], state["optimizer"], state["loss_per_rank"], final["model"]):
        tensors = list(_tensors(part))
        assert tensors and all(id(t) in copied_tensors for t in tensors)
    model.load_state_dict(final["model"])  # the module versions came along
