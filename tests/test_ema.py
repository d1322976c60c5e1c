"""ModelEma: the original's update rule, over parameters and BatchNorm buffers, of the unwrapped model."""
import copy

import pytest
import torch
import torch.nn as nn

from asl.training.ema import ModelEma


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))


def _trained_step(model: nn.Module) -> None:
    """Changes the parameters and the BN running statistics, as a training step does."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = model(torch.randn(4, 3, 6, 6))
    out.sum().backward()
    opt.step()


def test_update_is_the_original_formula_on_every_float_entry():
    model = _net().eval()
    model(torch.randn(1, 3, 6, 6))  # materialise the lazy layer (eval: BN statistics untouched)
    ema = ModelEma(model, decay=0.9)
    expected = {k: v.clone() for k, v in ema.state_dict().items()}
    for _ in range(3):
        _trained_step(model)
        ema.update(model)
        current = model.state_dict()
        for k, e in expected.items():
            if e.is_floating_point():
                # written out independently: decay * ema + (1 - decay) * model
                expected[k] = 0.9 * e + (1.0 - 0.9) * current[k]
            else:
                expected[k] = current[k].clone()
    got = ema.state_dict()
    assert got.keys() == expected.keys()
    for k in expected:
        assert torch.equal(got[k], expected[k]), k
    # the running statistics are averaged, not copied
    assert not torch.equal(got["1.running_mean"], model.state_dict()["1.running_mean"])
    assert got["1.num_batches_tracked"] == model.state_dict()["1.num_batches_tracked"] == 3


def test_copy_is_frozen_in_eval_mode_and_independent():
    model = _net()
    model(torch.randn(1, 3, 6, 6))
    ema = ModelEma(model, decay=0.5)
    assert not ema.module.training
    assert all(not p.requires_grad for p in ema.module.parameters())
    before = copy.deepcopy(ema.state_dict())
    _trained_step(model)
    for k, v in ema.state_dict().items():
        assert torch.equal(v, before[k])  # training the model does not touch the average until update()


def test_unwraps_compiled_style_wrappers_and_round_trips_state():
    model = _net()
    model(torch.randn(1, 3, 6, 6))

    class Wrapper(nn.Module):  # what torch.compile returns: the model under `_orig_mod`
        def __init__(self, inner):
            super().__init__()
            self._orig_mod = inner

    ema = ModelEma(Wrapper(model), decay=0.0)
    assert set(ema.state_dict()) == set(model.state_dict())  # no wrapper prefixes
    _trained_step(model)
    ema.update(Wrapper(model))
    for k, v in model.state_dict().items():
        assert torch.equal(ema.state_dict()[k], v)  # decay 0: a copy
    other = ModelEma(model, decay=0.9997)
    other.load_state_dict(ema.state_dict())
    assert all(torch.equal(other.state_dict()[k], v) for k, v in ema.state_dict().items())


def test_rejects_bad_decay():
    with pytest.raises(ValueError):
        ModelEma(nn.Linear(2, 2), decay=1.5)
