"""Speculative decoding with n-gram drafts (engine/speculative.py).

Greedy ids must be the same with and without drafts (random-weight variants and the
default model), seeded sampling must give the same text, the coupled rejection step must
accept a draft with probability p(d) and otherwise draw from p without d, and stops,
max_tokens, logprobs, preemption and n > 1 must behave as without drafts.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from tuili import LLM, SamplingParams
from tuili.engine.sampler import SampleRequest, Sampler
from tuili.engine.speculative import NgramProposer, StepCost, num_accepted, resolve_method

NEW = 24


def _prompts(tiny_model, folder):
    rnd = tiny_model.prompts(folder, [5, 23, 40])
    return rnd + [rnd[1][:8] * 4, list(range(10, 30)) * 2]


def _ids(llm, prompts, params):
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


class FreeRows(StepCost):
    """A step cost whose rows cost nothing: every draft a look-up finds is verified, whatever
    the host's timings, so the exactness tests exercise drafts in every step they can."""

    def observe(self, rows: int, seconds: float) -> None:
        pass

    def line(self) -> tuple[float, float]:
        return 1.0, 0.0


def _speculative(*args, **opts) -> LLM:
    llm = LLM(*args, speculative="ngram", **opts)
    llm.engine.proposer.cost = FreeRows()
    return llm


def _pair(folder, dtype="float32", **opts):
    base = LLM(str(folder), dtype=dtype, speculative="none", **opts)
    spec = _speculative(str(folder), dtype=dtype, speculative_tokens=4, **opts)
    return base, spec


def _skip_unless_rows_invariant(llm, dtype):
    """bf16 greedy ids match only where a row's sums do not depend on how many rows share the
    product (quant.rows_invariant, after the kernels' paths were chosen for the loaded model:
    AVX2, or AVX512-BF16 without AMX with one kernel at every row count). float32 runs on
    torch's matmul, whose rows do round differently with the row count; these short greedy
    runs have no near-tie for that to flip (float32 is checked on every CPU)."""
    from tuili.model.quant import rows_invariant

    if dtype == "bfloat16" and not rows_invariant(llm.engine.model):
        pytest.skip("bf16 products here switch kernels with the row count (a mixed widening, torch or AMX)")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_greedy_identical_on_random_variants(tiny_variant, tiny_model, dtype):
    prompts = _prompts(tiny_model, tiny_variant)
    base, spec = _pair(tiny_variant, dtype, block_size=4, num_kv_blocks=256, max_num_batched_tokens=64)
    _skip_unless_rows_invariant(spec, dtype)
    greedy = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True)
    assert _ids(spec, prompts, greedy) == _ids(base, prompts, greedy)
    stats = spec.engine.stats()
    assert stats["spec_accepted_tokens"] > 0 and stats["spec_draft_tokens"] >= stats["spec_accepted_tokens"]
    assert spec.engine.blocks.num_used_blocks == 0


@pytest.fixture(scope="module")
def llama_pair(tiny_model):
    folder = tiny_model("llama")
    return folder, _pair(folder, block_size=4, num_kv_blocks=256)


def test_seeded_sampling_same_text_and_n(llama_pair, tiny_model):
    folder, (base, spec) = llama_pair
    prompts = _prompts(tiny_model, folder)
    params = SamplingParams(temperature=0.8, top_k=20, max_tokens=NEW, ignore_eos=True, seed=11, n=2,
                            repetition_penalty=1.1)
    a = [[c.token_ids for c in o.outputs] for o in spec.generate(prompts, params)]
    b = [[c.token_ids for c in o.outputs] for o in spec.generate(prompts, params)]
    c = [[c.token_ids for c in o.outputs] for o in base.generate(prompts, params)]
    assert a == b == c
    assert all(len(x[0]) == NEW and x[0] != x[1] for x in a)


def test_stops_max_tokens_and_logprobs(llama_pair, tiny_model):
    folder, (base, spec) = llama_pair
    prompts = _prompts(tiny_model, folder)
    free = _ids(base, prompts, SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True))
    stop = free[-1][NEW // 2]  # a token the looping prompt produces mid-way
    for params in (SamplingParams(temperature=0, max_tokens=7, ignore_eos=True, logprobs=2),
                   SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True, stop_token_ids=[stop])):
        want = base.generate(prompts, params)
        got = spec.generate(prompts, params)
        for w, g in zip(want, got):
            w, g = w.outputs[0], g.outputs[0]
            assert g.token_ids == w.token_ids and g.finish_reason == w.finish_reason
            assert len(g.token_ids) <= params.max_tokens
            if params.stop_token_ids and stop in g.token_ids:
                assert g.token_ids.index(stop) == len(g.token_ids) - 1
            if params.logprobs is not None:
                assert len(g.logprobs) == len(g.token_ids)
                for lw, lg in zip(w.logprobs, g.logprobs):
                    assert lg.token_id == lw.token_id and math.isclose(lg.logprob, lw.logprob, abs_tol=1e-4)


def test_preemption_and_prefix_reuse(tiny_model):
    folder = tiny_model("llama")
    prompts = _prompts(tiny_model, folder)
    greedy = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True)
    base, spec = _pair(folder, block_size=4, num_kv_blocks=24, max_num_batched_tokens=64)
    want = _ids(base, prompts, greedy)
    assert _ids(spec, prompts, greedy) == want
    assert spec.engine.scheduler.num_preemptions > 0 and spec.engine.blocks.num_used_blocks == 0
    # Blocks hashed after verification steps are reused by a prompt that continues an output:
    # a wrong hash (an unverified draft in it) would give other ids than the plain engine.
    follow = [prompts[-1] + want[-1][:20]]
    assert _ids(spec, follow, greedy) == _ids(base, follow, greedy)


@pytest.mark.slow  # two loads of the default model: about 20 s on a quiet machine, minutes on a busy one
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_default_model_greedy_identical(default_model_folder, dtype):
    from tuili.bench.grounded import grounded_prompt_texts

    base = LLM("smollm2-135m-instruct", dtype=dtype, kv_cache_memory="128MiB", speculative="none")
    spec = _speculative("smollm2-135m-instruct", dtype=dtype, kv_cache_memory="128MiB")
    _skip_unless_rows_invariant(spec, dtype)
    texts = grounded_prompt_texts(base.get_tokenizer(), 3, 60, 120, seed=3)
    prompts = [base.chat_prompt_ids([{"role": "user", "content": t}]) for t in texts]
    greedy = SamplingParams(temperature=0, max_tokens=40)
    assert _ids(spec, prompts, greedy) == _ids(base, prompts, greedy)
    assert spec.engine.stats()["spec_accepted_tokens"] > 10


def test_rejection_step_is_exact():
    """Draw at the draft's row and accept iff it equals the draft: P(accept) must be p(d), and
    a rejected step must emit tokens distributed as p with d removed, renormalised."""
    torch.manual_seed(0)
    vocab, trials = 6, 40000
    logits = torch.tensor([[1.0, 0.2, -0.5, 0.7, 0.0, -1.0]])
    p = torch.softmax(logits[0] / 0.7, dim=-1)
    sampler = Sampler(torch.device("cpu"), seed=5)
    params = SamplingParams(temperature=0.7, max_tokens=4)
    for d in (0, 4):  # a likely draft and an unlikely one
        rows = [SampleRequest(params, [1], [])] * trials
        drawn = sampler(logits.expand(trials, vocab).contiguous(), rows).token_ids
        accepted = [num_accepted([d], [t, 0]) for t in drawn]
        rate = sum(accepted) / trials
        sd = math.sqrt(p[d] * (1 - p[d]) / trials)
        assert abs(rate - p[d].item()) < 4 * sd
        rejected = [t for t, a in zip(drawn, accepted) if not a]
        assert d not in rejected
        resid = p.clone()
        resid[d] = 0
        resid /= resid.sum()
        counts = torch.bincount(torch.tensor(rejected), minlength=vocab).double()
        expected = resid.double() * len(rejected)
        keep = expected > 0
        chi2 = (((counts - expected) ** 2)[keep] / expected[keep]).sum().item()
        assert chi2 < 20.5  # 4 degrees of freedom: p < 0.0004 of a false alarm


def test_proposer_lookup_and_guides():
    prop = NgramProposer(4)
    seq = SimpleNamespace(seq_id=1, token_ids=[7, 8, 9, 10, 11, 3, 7, 8, 9], guide=None)
    assert prop.propose(seq, 10) == [10, 11, 3, 7]  # the longest suffix match, its followers
    assert prop.states[1].match == 3
    assert prop.propose(seq, 2) == [10, 11]
    seq.token_ids += [10, 5]
    assert prop.propose(seq, 10) == []  # nothing ever followed "10 5"
    loop = SimpleNamespace(seq_id=3, token_ids=[1, 2, 1], guide=None)
    assert prop.propose(loop, 4) == [2, 1]
    guided = SimpleNamespace(seq_id=2, token_ids=[1, 2, 1, 2, 1], guide=object())
    assert prop.propose(guided, 4) == []  # grammar-carrying sequences are never drafted for
    assert prop.plan([(guided, 4)], 1, 100) == {}


def test_step_cost_fits_a_line_and_forgets_old_steps():
    cost = StepCost(decay=0.9)
    assert cost.line() == (1.0, 0.1)  # nothing seen: the prior slope
    for _ in range(5):
        cost.observe(1, 0.020)
    a, b = cost.line()  # one row count only: prior slope, the line through the mean
    assert b == pytest.approx(0.1 * a) and a + b == pytest.approx(0.020)
    for _ in range(50):  # an old machine: 10 ms + 1 ms a row
        for rows in (1, 2, 4, 6):
            cost.observe(rows, 0.010 + 0.001 * rows)
    a, b = cost.line()
    assert a == pytest.approx(0.010, rel=1e-3) and b == pytest.approx(0.001, rel=1e-2)
    for _ in range(50):  # the same steps, now twice as fast per row
        for rows in (1, 2, 4, 6):
            cost.observe(rows, 0.010 + 0.0005 * rows)
    a, b = cost.line()
    assert a == pytest.approx(0.010, rel=1e-2) and b == pytest.approx(0.0005, rel=3e-2)


def _copying(seq_id):  # a sequence whose last tokens match earlier ones, 6 followers
    return SimpleNamespace(seq_id=seq_id, token_ids=list(range(100, 110)) * 2 + [100], guide=None)


def _trained(slope, accepted):
    """A proposer whose steps cost 1 + slope a row beyond the first, and four sequences copying
    their prompts whose last 8 verifications accepted `accepted` of 6 drafts."""
    prop = NgramProposer(6)
    for _ in range(40):
        prop.observe_step(1, 1.0)
        prop.observe_step(5, 1.0 + 4 * slope)
    seqs = [_copying(i) for i in range(4)]
    for s in seqs:
        prop.propose(s, 6)
        for _ in range(8):
            prop.observe(s, 6, accepted)
    return prop, seqs


def test_drafts_follow_row_cost_and_acceptance():
    # cheap rows (a step bound by reading the weights) and drafts that land: all of them
    prop, seqs = _trained(0.02, 6)
    assert prop.plan([(seqs[0], 6)], 1, 100) == {0: list(range(101, 107))}
    assert prop.plan([(seqs[0], 3)], 1, 100) == {0: [101, 102, 103]}  # within the sequence's limit
    assert sum(map(len, prop.plan([(s, 6) for s in seqs], 4, 5).values())) == 5  # within the budget
    # rows that cost as much as the step: even landing drafts do not pay in a batch of 16
    prop, seqs = _trained(1.0, 6)
    assert prop.plan([(s, 6) for s in seqs], 16, 100) == {}
    # drafts that break after the third: three
    prop, seqs = _trained(0.3, 3)
    assert prop.plan([(seqs[0], 6)], 1, 100) == {0: [101, 102, 103]}
    # drafts that keep failing: none at batch 1 even with cheap rows
    prop, seqs = _trained(0.02, 0)
    assert prop.plan([(seqs[0], 6)], 1, 100) == {}
    # with dearer rows, the sequence drifts back to the shared rate while it does not draft,
    # then tries again once other sequences' drafts land
    prop, seqs = _trained(0.3, 0)
    other = SimpleNamespace(seq_id=9, token_ids=[5, 6, 7, 5, 6, 7, 5, 6, 7, 5], guide=None)
    for _ in range(60):  # the other sequences land theirs (the shared rates recover)
        prop.propose(other, 6)
        prop.observe(other, 6, 6)
    tries = 0
    while not prop.plan([(seqs[0], 6)], 1, 100):
        tries += 1
        assert tries < 40
    assert tries > 0


def test_sequences_whose_drafts_cannot_pay_are_not_looked_up(monkeypatch):
    """A sequence whose first draft could not clear the step's bar even at the best shared rate
    costs no look-up; the plan is the one the look-ups would have given."""
    looked = []
    real = NgramProposer._lookup
    monkeypatch.setattr(NgramProposer, "_lookup", lambda self, *a: looked.append(1) or real(self, *a))
    prop, seqs = _trained(1.0, 0)  # dear rows, drafts that fail: nothing can pay in a batch of 16
    looked.clear()
    assert prop.plan([(s, 6) for s in seqs], 16, 100) == {}
    assert not looked
    prop, seqs = _trained(0.02, 6)  # cheap rows, drafts that land: looked up and drafted
    looked.clear()
    assert prop.plan([(seqs[0], 6)], 1, 100) == {0: list(range(101, 107))}
    assert looked
    # the same plans as with every sequence looked up, over states from failing to landing
    for slope in (0.02, 0.3, 1.0):
        for accepted in (0, 2, 6):
            for rows in (1, 4, 16, 32):
                prop, seqs = _trained(slope, accepted)
                ref, ref_seqs = _trained(slope, accepted)
                want = _plan_looking_up_all(ref, [(s, 6) for s in ref_seqs], rows, 100)
                assert prop.plan([(s, 6) for s in seqs], rows, 100) == want, (slope, accepted, rows)


def _plan_looking_up_all(prop, candidates, base_rows, max_drafts):
    """`plan` as it was before sequences were skipped: every candidate looked up."""
    drafts, offers = {}, []
    for seq, limit in candidates:
        toks = prop.propose(seq, limit)
        if toks:
            drafts[seq.seq_id] = toks
            offers += [(p, seq.seq_id, j) for j, p in enumerate(prop.emit_chances(seq, len(toks)))]
    offers.sort(key=lambda o: -o[0])
    a, b = prop.cost.line()
    expected, cost, taken = float(base_rows), a + b * base_rows, {}
    for p, sid, j in offers[:max_drafts]:
        if p * cost <= b * expected:
            break
        expected += p
        cost += b
        taken[sid] = j + 1
    return {sid: drafts[sid][:n] for sid, n in taken.items()}


def test_prometheus_counters_follow_engine_totals():
    from tuili.serve.metrics import Metrics

    stats = {"running": 0, "waiting": 0, "kv_blocks_used": 0, "kv_blocks_free": 1, "preemptions": 0,
             "prefix_hit_tokens": 0, "prefix_query_tokens": 0, "spec_draft_tokens": 9, "spec_accepted_tokens": 4}
    engine = SimpleNamespace(stats=lambda: stats)
    models = SimpleNamespace(all=lambda: [SimpleNamespace(name="m", engine=engine)])
    metrics = Metrics()
    metrics.render(models)
    stats.update(spec_draft_tokens=15, spec_accepted_tokens=10)
    text = metrics.render(models).decode()
    assert 'tuili_spec_draft_tokens_total{model="m"} 15.0' in text
    assert 'tuili_spec_accepted_tokens_total{model="m"} 10.0' in text


def test_no_drafts_while_the_batch_is_fuller_than_max_batch(tiny_model):
    folder = tiny_model.variant("llama-gqa-untied")
    prompts = [list(range(10, 30)) * 2 for _ in range(3)]  # repetitive: n-gram drafts find matches
    params = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True)
    few = _speculative(str(folder), dtype="float32", speculative_max_batch=2)
    few.generate(prompts, params)  # three run together to the end: more than 2, never a draft
    assert few.engine.proposer.drafted_tokens == 0
    many = _speculative(str(folder), dtype="float32", speculative_max_batch=3)
    assert _ids(many, prompts, params) == _ids(few, prompts, params)
    assert many.engine.proposer.drafted_tokens > 0
    with pytest.raises(ValueError, match="speculative_max_batch"):
        LLM(str(folder), dtype="float32", speculative="ngram", speculative_max_batch=0)


def test_chances_are_scaled_by_how_often_taken_drafts_land():
    prop = NgramProposer(4)
    for _ in range(20):
        prop.observe_step(1, 1.0)
        prop.observe_step(5, 1.1)
    seq = _copying(1)
    before = prop.plan([(seq, 4)], 1, 100)
    assert before and prop.calibration == 1.0
    p0 = prop.emit_chances(seq, 1)[0]
    for _ in range(10):  # drafts taken with good chances that land only one time in four
        drafts = prop.plan([(seq, 4)], 1, 100)
        prop.observe(seq, len(drafts[1]), 1 if _ % 4 == 0 else 0)
        prop.observe(_copying(2), 4, 4)  # another sequence keeps the shared rates high
    assert prop.calibration < 0.8
    assert prop.emit_chances(seq, 1)[0] < p0


def test_auto_resolves_by_rows_invariance():
    assert resolve_method("auto", True)[0] == "ngram"
    assert resolve_method("auto", False)[0] == "none"
    assert resolve_method("none", True)[0] == "none" and resolve_method("ngram", False)[0] == "ngram"


def test_auto_drafts_only_where_no_token_can_change(tiny_model):
    """The default (`speculative="auto"`) drafts where every packed product's rows do not depend
    on the row count (bf16 on one kernel throughout, int8 and int4 wherever the kernels run but AMX),
    giving the same greedy ids as no drafts there; float32 (torch's matmul) never drafts."""
    from tuili.model.kernels import cpu_kernels
    from tuili.model.paths import bf16_rows_invariant
    from tuili.model.quant import rows_invariant

    ext = cpu_kernels()
    kernels = ext is not None and ext.gemm_available() and not ext.gemm_amx_available()  # AMX: never checked
    folder = tiny_model("llama", intermediate_size=128)  # int4 groups of 32 divide every width
    opts = dict(block_size=4, num_kv_blocks=256, max_num_batched_tokens=64)
    f32 = LLM(str(folder), dtype="float32", **opts)
    assert f32.engine.speculative == "none" and f32.engine.proposer is None
    assert not rows_invariant(f32.engine.model)
    prompts = _prompts(tiny_model, folder)
    greedy = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True)
    checked = 0
    for quant in ("none", "int8", "int4"):
        auto = LLM(str(folder), dtype="bfloat16", quantization=quant, **opts)
        invariant = rows_invariant(auto.engine.model)
        # bf16 needs more: no plain copy for torch and one widening choice (measured for these shapes)
        assert invariant <= bf16_rows_invariant() if quant == "none" else invariant == kernels, quant
        assert auto.engine.speculative == ("ngram" if invariant else "none")
        if not invariant:
            assert auto.engine.proposer is None
            continue
        auto.engine.proposer.cost = FreeRows()
        plain = LLM(str(folder), dtype="bfloat16", quantization=quant, speculative="none", **opts)
        assert _ids(auto, prompts, greedy) == _ids(plain, prompts, greedy), quant
        assert auto.engine.stats()["spec_accepted_tokens"] > 0 and plain.engine.stats()["spec_draft_tokens"] == 0
        checked += 1
    if not checked:
        pytest.skip("products here switch kernels with the row count: auto does not draft")
