"""BatchThreads: how it splits a batch, in which threads and modes the shares run, what it leaves behind, and that
the prepared TResNet through it keeps the function."""
import threading

import pytest
import torch
import torch.nn as nn

from asl.models import create_model, prepare_for_inference
from asl.models.batch_threads import BatchThreads


class Recorder(nn.Module):
    """Doubles its input and notes, for each call, the batch size, the thread, torch's thread count there and the
    grad and inference modes."""

    def __init__(self, fail_on: int = -1):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(2.0), requires_grad=False)
        self.calls = []
        self.fail_on = fail_on
        self.lock = threading.Lock()

    def forward(self, x):
        with self.lock:
            self.calls.append((x.shape[0], threading.get_ident(), torch.get_num_threads(), torch.is_grad_enabled(),
                               torch.is_inference_mode_enabled()))
        if x.shape[0] == self.fail_on:
            raise KeyError("a bug inside the model")
        return x * self.scale


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_splits_the_batch_between_threads_of_one_torch_thread_each(two_threads):
    inner = Recorder()
    model = BatchThreads(inner)
    x = torch.arange(8 * 3, dtype=torch.float32).view(8, 3)
    with torch.no_grad():
        out = model(x)
    assert torch.equal(out, 2 * x)
    assert sorted(c[0] for c in inner.calls) == [4, 4]
    assert len({c[1] for c in inner.calls}) == 2 and threading.get_ident() in {c[1] for c in inner.calls}
    assert all(c[2] == 1 and not c[3] for c in inner.calls)
    assert torch.get_num_threads() == 2  # the caller's count is back


def test_odd_batches_single_images_and_modes(two_threads):
    inner = Recorder()
    model = BatchThreads(inner)
    with torch.inference_mode():
        out = model(torch.ones(3, 2))
    assert sorted(c[0] for c in inner.calls) == [1, 2] and all(c[4] for c in inner.calls)
    assert out.is_inference() and torch.equal(out, torch.full((3, 2), 2.0))
    inner.calls.clear()
    with torch.no_grad():
        model(torch.ones(1, 2))
    assert [c[:3] for c in inner.calls] == [(1, threading.get_ident(), 2)]


def test_steps_aside_where_gradients_are_needed(two_threads):
    inner = Recorder()
    inner.scale.requires_grad_(True)
    model = BatchThreads(inner)
    x = torch.ones(4, 2)
    model(x).sum().backward()
    assert [c[0] for c in inner.calls] == [4] and inner.scale.grad.item() == 8.0
    inner.calls.clear()
    model(x.double().requires_grad_(True))  # and on other dtypes
    assert [c[0] for c in inner.calls] == [4]


def test_errors_reach_the_caller_and_the_thread_count_is_restored(two_threads):
    model = BatchThreads(Recorder(fail_on=2))
    with torch.no_grad(), pytest.raises(KeyError, match="a bug inside the model"):
        model(torch.ones(4, 2))
    assert torch.get_num_threads() == 2


def test_prepared_tresnet_keeps_the_function(two_threads):
    torch.manual_seed(0)
    model = create_model("tresnet_m", 5).eval()
    fast = prepare_for_inference(model)
    assert isinstance(fast, BatchThreads)
    assert not isinstance(prepare_for_inference(model, batch_threads=False), BatchThreads)
    x = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        expected = model.double()(x.double())
        got = fast(x)
    assert ((got.double() - expected).abs().max() / expected.abs().max()).item() < 1e-4
