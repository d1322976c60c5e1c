"""The class prior of CSL: its running estimate (the official ComputePrior's mean of the training sigmoid outputs),
kept across a resume and summed over processes, and its CSV file in the official layout."""
import numpy as np
import torch

from asl.class_prior import PriorEstimate, prior_csv_text, read_prior_csv
from asl.training.state import create_train_state


def batches(n=5, size=3, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(size, classes, generator=g) * 3 for _ in range(n)]


def test_the_estimate_is_the_mean_sigmoid_over_every_sample_seen():
    logits = batches()
    prior = PriorEstimate(4)
    for x in logits:
        prior.update(x)
    expected = torch.sigmoid(torch.cat(logits).double()).mean(dim=0)
    torch.testing.assert_close(prior.mean().double(), expected, rtol=1e-6, atol=1e-7)
    assert prior.count == 15 and PriorEstimate(4).mean() is None


def test_a_resumed_estimate_continues_exactly_and_rides_in_the_train_state():
    logits = batches()
    whole = PriorEstimate(4)
    for x in logits:
        whole.update(x)
    first = PriorEstimate(4)
    for x in logits[:2]:
        first.update(x)
    state = create_train_state(torch.nn.Linear(2, 4), lr=1e-3, weight_decay=0, ema_decay=0.9, epochs=1,
                               steps_per_epoch=1, amp_dtype=None, device=torch.device("cpu"))
    state.prior = first
    saved = state.state_dict()
    resumed_state = create_train_state(torch.nn.Linear(2, 4), lr=1e-3, weight_decay=0, ema_decay=0.9, epochs=1,
                                       steps_per_epoch=1, amp_dtype=None, device=torch.device("cpu"))
    resumed_state.prior = PriorEstimate(4)
    resumed_state.load_state_dict(saved)
    for x in logits[2:]:
        resumed_state.prior.update(x)
    assert torch.equal(resumed_state.prior.mean(), whole.mean())


def test_several_processes_sum_their_estimates_and_one_takes_the_saved_total():
    # Two processes that saw the same batches: the reduce (a sum over processes) doubles sums and counts alike.
    def two_processes(t):
        return t * 2

    prior = PriorEstimate(4, reduce=two_processes)
    for x in batches():
        prior.update(x)
    single = PriorEstimate(4)
    for x in batches():
        single.update(x)
    torch.testing.assert_close(prior.mean(), single.mean())
    saved = prior.state_dict()
    assert saved["count"] == 30
    other = PriorEstimate(4, holds_total=False)
    other.load_state_dict(saved)
    assert other.count == 0 and not other.total.any()


def test_the_file_has_the_official_layout_and_reads_back(tmp_path):
    values = np.array([0.542279, 0.13131638, 1e-9], dtype=np.float32)
    text = prior_csv_text(["person", "hot dog, grilled", "x"], values.tolist())
    assert text.splitlines() == ["Classes,avg_pred", "person,0.542279", '"hot dog, grilled",0.13131638', "x,1e-09"]
    path = tmp_path / "prior.csv"
    path.write_text(text)
    names, read = read_prior_csv(path)
    assert names == ["person", "hot dog, grilled", "x"]
    assert np.array_equal(np.float32(read), values)
