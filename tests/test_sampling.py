"""SamplingParams validation and the sampler's processing steps, on hand-made logits."""
import math

import pytest
import torch

from tuili.engine.sampler import SampleRequest, Sampler
from tuili.sampling import SamplingParams


def row(params, prompt=(1, 2), output=(), seed=None, eos=(0,)):
    g = None
    if seed is not None:
        g = torch.Generator().manual_seed(seed)
    return SampleRequest(params, list(prompt), list(output), g, list(eos))


@pytest.mark.parametrize("field,value", [
    ("n", 0), ("max_tokens", 0), ("min_tokens", -1), ("temperature", -0.5), ("top_p", 0.0),
    ("top_p", 1.5), ("top_k", -3), ("min_p", 1.5), ("presence_penalty", 3.0),
    ("frequency_penalty", -2.5), ("repetition_penalty", 0.0), ("logprobs", 21), ("stop", [""]),
    ("stop_token_ids", [-1]),
])
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_min_tokens_above_max_tokens_rejected():
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(max_tokens=3, min_tokens=5)


def test_stop_string_becomes_list():
    assert SamplingParams(stop="END").stop == ["END"]


def test_greedy_picks_argmax():
    logits = torch.tensor([[0.0, 1.0, 5.0, 2.0], [3.0, 0.0, 0.0, 0.0]])
    res = Sampler(torch.device("cpu"), 0)(logits, [row(SamplingParams(temperature=0))] * 2)
    assert res.token_ids == [2, 0]


def test_top_k_one_is_greedy_even_at_high_temperature():
    logits = torch.tensor([[0.0, 1.0, 1.2, 0.5]])
    s = Sampler(torch.device("cpu"), 0)
    for seed in range(20):
        assert s(logits, [row(SamplingParams(temperature=5.0, top_k=1), seed=seed)]).token_ids == [2]


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = Sampler._top_k_top_p(probs, [-1], [0.7])
    assert kept[0].tolist() == pytest.approx([0.5, 0.3, 0.0, 0.0])
    kept = Sampler._top_k_top_p(probs, [-1], [0.5])
    assert kept[0].tolist() == [0.5, 0.0, 0.0, 0.0]


def test_min_p_removes_unlikely_tokens():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.09, 0.01]]))
    s = Sampler(torch.device("cpu"), 0)
    seen = {s(logits, [row(SamplingParams(temperature=1.0, min_p=0.2), seed=i)]).token_ids[0] for i in range(200)}
    assert seen == {0, 1}


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    s = Sampler(torch.device("cpu"), 0)
    counts = [0, 0, 0]
    for i in range(2000):
        counts[s(logits, [row(SamplingParams(temperature=1.0))]).token_ids[0]] += 1
    assert abs(counts[0] / 2000 - 0.7) < 0.05 and abs(counts[2] / 2000 - 0.1) < 0.03


def test_seeded_draws_do_not_depend_on_batch_neighbours():
    torch.manual_seed(0)
    logits = torch.randn(5, 50)
    params = SamplingParams(temperature=1.0)
    alone = Sampler(torch.device("cpu"), 1)(logits[2:3], [row(params, seed=42)]).token_ids
    batch_rows = [row(params) for _ in range(5)]
    batch_rows[2] = row(params, seed=42)
    batched = Sampler(torch.device("cpu"), 2)(logits, batch_rows).token_ids
    assert batched[2] == alone[0]


def test_repetition_penalty_lowers_seen_tokens():
    logits = torch.tensor([[2.0, 1.9, -1.0, -1.1]])
    p = SamplingParams(temperature=0, repetition_penalty=2.0)
    assert Sampler(torch.device("cpu"))(logits, [row(p, prompt=[0], output=[])]).token_ids == [1]
    # a negative seen logit gets more negative
    assert Sampler(torch.device("cpu"))(torch.tensor([[-1.0, -1.5, -3.0, -9.0]]),
                                        [row(p, prompt=[0])]).token_ids == [1]


def test_presence_and_frequency_penalties_use_output_counts():
    logits = torch.tensor([[3.0, 2.5, 0.0, 0.0]])
    p = SamplingParams(temperature=0, frequency_penalty=0.4)
    s = Sampler(torch.device("cpu"))
    assert s(logits, [row(p, output=[0])]).token_ids == [0]  # 3.0 - 0.4 > 2.5
    assert s(logits, [row(p, output=[0, 0])]).token_ids == [1]  # 3.0 - 0.8 < 2.5
    p = SamplingParams(temperature=0, presence_penalty=1.0)
    assert s(logits, [row(p, output=[0, 0, 0])]).token_ids == [1]


def test_min_tokens_masks_eos_and_stop_ids():
    logits = torch.tensor([[9.0, 1.0, 5.0, 0.0]])
    p = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[2])
    s = Sampler(torch.device("cpu"))
    assert s(logits, [row(p, output=[], eos=[0])]).token_ids == [1]
    assert s(logits, [row(p, output=[1, 1], eos=[0])]).token_ids == [0]


def test_logprobs_are_raw_model_logprobs_with_top_k():
    logits = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    p = SamplingParams(temperature=0, logprobs=2, repetition_penalty=5.0)
    res = Sampler(torch.device("cpu"))(logits, [row(p, prompt=[2])])
    chosen, top = res.logprobs[0]
    lsm = torch.log_softmax(logits[0], -1)
    assert res.token_ids == [1]  # the penalty moved the choice ...
    assert math.isclose(chosen, lsm[1].item(), rel_tol=1e-6)  # ... but logprobs are the model's
    assert [t for t, _ in top] == [2, 1]
    assert math.isclose(top[0][1], lsm[2].item(), rel_tol=1e-6)


def test_mixed_batch_greedy_rows_and_sampled_rows_never_pick_removed_tokens():
    # Row 0 greedy; row 1 top_k=2 over a flat-ish row whose best two tokens sit apart, so the
    # removed tokens between them (probability 0 after top_k) must never be drawn.
    logits = torch.tensor([[0.0, 4.0, 1.0, 2.0, 0.5], [2.0, 1.0, 1.0, 1.0, 2.0 + math.log(3.0)]])
    s = Sampler(torch.device("cpu"), 0)
    rows = [row(SamplingParams(temperature=0)), row(SamplingParams(temperature=1.0, top_k=2))]
    counts = [0] * 5
    for _ in range(2000):
        res = s(logits, rows).token_ids
        assert res[0] == 1
        counts[res[1]] += 1
    assert counts[1] == counts[2] == counts[3] == 0
    assert abs(counts[4] / 2000 - 0.75) < 0.04  # exp(2 + ln 3) : exp(2) = 3 : 1
