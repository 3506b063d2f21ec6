"""Scheduler without a model: token budgets, chunked prefill, admission, preemption, freeing."""
from tuili.config import SchedulerConfig
from tuili.engine.kv_cache import BlockManager
from tuili.engine.scheduler import Scheduler
from tuili.engine.sequence import Sequence
from tuili.sampling import SamplingParams


def make(num_blocks=16, block_size=4, max_seqs=8, budget=32, prefix=False, chunk=None):
    bm = BlockManager(num_blocks, block_size, enable_prefix_caching=prefix)
    return Scheduler(SchedulerConfig(max_seqs, budget, chunk), bm)


def seq(n, rid, start=0):
    return Sequence(rid, 0, list(range(start, start + n)), SamplingParams(max_tokens=100))


def run_step(s: Scheduler, sample_token=7):
    """Mimic the engine: advance counts, append a token to those that sampled."""
    out = s.schedule()
    samplers = [x.seq for x in out.scheduled if x.samples]
    s.update_after_step(out)
    for q in samplers:
        q.append(sample_token)
    return out


def test_chunked_prefill_respects_budget_and_mixes_with_decodes():
    s = make(budget=10)
    a, b = seq(6, "a"), seq(25, "b")
    s.add(a)
    s.add(b)
    out = run_step(s)
    assert [(x.seq.request_id, x.num_new_tokens) for x in out.scheduled] == [("a", 6), ("b", 4)]
    assert out.num_tokens == 10
    out = run_step(s)  # a decodes (1 token), b continues its prefill with the rest of the budget
    assert [(x.seq.request_id, x.num_new_tokens) for x in out.scheduled] == [("a", 1), ("b", 9)]
    assert not out.scheduled[1].samples
    out = run_step(s)
    assert [(x.seq.request_id, x.num_new_tokens) for x in out.scheduled] == [("a", 1), ("b", 9)]
    assert b.num_computed_tokens == 22
    out = run_step(s)
    assert [(x.seq.request_id, x.num_new_tokens) for x in out.scheduled] == [("a", 1), ("b", 3)]
    assert b.num_output_tokens == 1  # the last chunk sampled b's first token


def test_long_prefill_threshold_caps_a_chunk():
    s = make(budget=32, chunk=8)
    s.add(seq(20, "a"))
    assert run_step(s).scheduled[0].num_new_tokens == 8


def test_max_num_seqs_limits_admission():
    s = make(max_seqs=2, budget=100)
    for r in "abc":
        s.add(seq(3, r))
    out = run_step(s)
    assert [x.seq.request_id for x in out.scheduled] == ["a", "b"]
    assert [q.request_id for q in s.waiting] == ["c"]


def test_admission_waits_for_blocks_fcfs():
    s = make(num_blocks=4, block_size=4, budget=100)
    s.add(seq(10, "a"))  # 3 blocks
    s.add(seq(8, "b"))   # 2 blocks: does not fit yet
    s.add(seq(2, "c"))   # would fit, but FCFS keeps it behind b
    out = run_step(s)
    assert [x.seq.request_id for x in out.scheduled] == ["a"]
    assert [q.request_id for q in s.waiting] == ["b", "c"]


def test_finish_frees_blocks_and_admits_next():
    s = make(num_blocks=4, block_size=4, budget=100)
    a, b = seq(10, "a"), seq(8, "b")
    s.add(a)
    s.add(b)
    run_step(s)
    assert s.blocks.num_free_blocks == 1
    s.finish(a)
    assert s.blocks.num_free_blocks == 4 and a.block_table == []
    out = run_step(s)
    assert [x.seq.request_id for x in out.scheduled] == ["b"]


def test_abort_of_waiting_sequence_removes_it():
    s = make()
    a = seq(3, "a")
    s.add(a)
    s.finish(a)
    assert not s.has_work() and s.blocks.num_free_blocks == 16


def test_preemption_takes_the_latest_admitted_and_recomputes_it():
    s = make(num_blocks=4, block_size=4, budget=100)
    a, b = seq(7, "a"), seq(7, "b")
    s.add(a)
    s.add(b)
    run_step(s)  # both prefilled: 2 blocks each, 8 tokens each (7 computed)
    run_step(s)  # the 8th token fills block 2: 9 tokens each
    assert s.blocks.num_free_blocks == 0
    out = run_step(s)  # a needs a third block for its 9th token: b (admitted last) is preempted
    assert [q.request_id for q in out.preempted] == ["b"]
    assert [x.seq.request_id for x in out.scheduled] == ["a"]
    assert b.num_computed_tokens == 0 and b.block_table == [] and b.num_preemptions == 1
    assert s.waiting[0] is b and s.running == [a]
    assert s.num_preemptions == 1
    s.finish(a)
    out = run_step(s)  # b comes back and recomputes prompt + generated tokens
    assert [(x.seq.request_id, x.num_new_tokens) for x in out.scheduled] == [("b", 9)]


def test_sequence_preempts_itself_when_alone_and_out_of_blocks():
    s = make(num_blocks=2, block_size=4, budget=100)
    a = seq(8, "a")
    s.add(a)
    run_step(s)
    out = run_step(s)  # needs a third block, nothing else to evict
    assert out.preempted == [a] and out.scheduled == []


def test_prefix_reuse_in_admission():
    s = make(num_blocks=16, block_size=4, budget=100, prefix=True)
    a = seq(12, "a")
    s.add(a)
    run_step(s)
    b = seq(12, "b")
    s.add(b)
    out = run_step(s)
    got = {x.seq.request_id: x.num_new_tokens for x in out.scheduled}
    assert got == {"a": 1, "b": 4}  # b reuses 2 of a's 3 full blocks
    assert b.num_cached_prompt_tokens == 8
    assert b.block_table[:2] == a.block_table[:2]
