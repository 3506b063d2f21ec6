"""AsyncEngine: built and stepped in one thread, deltas on one queue per call, faults contained.

Each fault test injects an exception where the engine meets a request (adding it, stepping
it) and checks that only the requests concerned fail, with the engine's error types, and
that the next requests are served.
"""
import asyncio
import threading

import pytest

from tuili import SamplingParams
from tuili.engine import AsyncEngine, EngineDeadError, EngineError, InvalidRequestError
from tuili.engine.engine import Engine

GREEDY = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)


@pytest.fixture(scope="module")
def folder(tiny_model):
    return tiny_model("llama", max_position_embeddings=128)


def started(build) -> AsyncEngine:
    served = AsyncEngine.load(build, max_queue=16)
    served.start()
    return served


async def run_call(served: AsyncEngine, prompts, params=GREEDY):
    """All deltas of one call, summed per prompt: (token ids, finish reason) per prompt."""
    out = {k: ([], None) for k in range(len(prompts))}
    async for k, delta in served.generate(prompts, params):
        for c in delta.outputs:
            ids, reason = out[k]
            out[k] = (ids + c.token_ids, c.finish_reason or reason)
    return [out[k] for k in range(len(prompts))]


def settled(served: AsyncEngine, timeout: float = 5.0) -> dict:
    """The engine's stats once nothing runs (the snapshot is taken just after a step's deltas go out)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        s = served.stats()
        if (s["running"] == 0 and s["waiting"] == 0) or time.monotonic() > deadline:
            return s
        time.sleep(0.02)


def test_load_builds_and_steps_the_engine_in_one_thread_and_answers(folder):
    threads = {}

    class Recording(Engine):
        def __init__(self, *args, **kwargs):
            threads["build"] = threading.get_ident()
            super().__init__(*args, **kwargs)

        def step(self):
            threads.setdefault("step", set()).add(threading.get_ident())
            return super().step()

    served = AsyncEngine.load(lambda: Recording(str(folder), dtype="float32"), max_queue=8)
    assert threads["build"] != threading.get_ident()
    served.start()
    try:
        (ids, reason), = asyncio.run(run_call(served, [[5, 6, 7, 8]]))
        assert len(ids) == 5 and reason == "length"
        assert threads["step"] == {threads["build"]}
        assert served.model_name and served.max_model_len == 128
    finally:
        served.shutdown()
    assert not served.is_alive


def test_an_error_while_building_is_raised_in_the_caller_and_a_never_started_engine_shuts_down(folder):
    with pytest.raises(ValueError, match="no such model"):
        AsyncEngine.load(lambda: (_ for _ in ()).throw(ValueError("no such model")))
    served = AsyncEngine.load(lambda: Engine(str(folder), dtype="float32"))
    assert served.is_alive  # waiting for start()
    served.shutdown()
    assert not served.is_alive


def test_deltas_carry_each_token_once_and_sum_to_the_offline_answer(folder):
    engine = Engine(str(folder), dtype="float32")
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, n=2, seed=1)
    want = engine.generate([("x", [9, 8, 7, 6, 5], params)])[0]
    served = started(lambda: Engine(str(folder), dtype="float32"))
    try:
        async def go():
            per_step = []
            total = {0: [], 1: []}
            async for _, delta in served.generate([[9, 8, 7, 6, 5]], params):
                per_step.append(sum(len(c.token_ids) for c in delta.outputs))
                for c in delta.outputs:
                    total[c.index] += c.token_ids
            return per_step, total

        per_step, total = asyncio.run(go())
        assert max(per_step) <= 2  # one new token per completion per step, never the whole output again
        assert [total[0], total[1]] == [c.token_ids for c in want.outputs]
    finally:
        served.shutdown()


def test_a_failure_while_adding_fails_that_request_only(folder):
    class Faulty(Engine):
        def add_request(self, request_id, prompt, params):
            if list(prompt)[:1] == [13]:
                raise RuntimeError("injected add failure")
            return super().add_request(request_id, prompt, params)

    served = started(lambda: Faulty(str(folder), dtype="float32"))
    try:
        async def go():
            good = asyncio.create_task(run_call(served, [[5, 6, 7]]))
            with pytest.raises(EngineError, match="injected add failure"):
                await run_call(served, [[13, 6, 7]])
            return await good, await run_call(served, [[7, 7, 7]])

        (first,), (after,) = asyncio.run(go())
        assert len(first[0]) == 5 and len(after[0]) == 5
        assert served.is_alive and settled(served)["kv_blocks_used"] == 0
    finally:
        served.shutdown()


def test_a_bad_prompt_is_an_invalid_request_and_the_call_s_other_prompts_end_too(folder):
    served = started(lambda: Engine(str(folder), dtype="float32"))
    try:
        async def go():
            with pytest.raises(InvalidRequestError, match="token ids"):
                await run_call(served, [[5, 6], [999999]])
            return settled(served)

        stats = asyncio.run(go())
        assert stats["running"] == 0 and stats["waiting"] == 0 and stats["kv_blocks_used"] == 0
    finally:
        served.shutdown()


def test_a_failing_step_fails_the_requests_in_flight_and_the_next_ones_succeed(folder):
    fail = threading.Event()

    class Faulty(Engine):
        def step(self):
            if fail.is_set():
                fail.clear()
                raise RuntimeError("injected step failure")
            return super().step()

    served = started(lambda: Faulty(str(folder), dtype="float32"))
    try:
        fail.set()
        with pytest.raises(EngineError, match="injected step failure"):
            asyncio.run(run_call(served, [[5, 6, 7]]))
        (after,) = asyncio.run(run_call(served, [[5, 6, 7]]))
        assert len(after[0]) == 5 and served.is_alive
    finally:
        served.shutdown()


def test_a_dead_loop_fails_every_waiting_call_at_once_and_refuses_new_ones(folder):
    class Dying(Engine):
        def step(self):
            raise SystemExit("injected loop death")  # not an Exception: the step guard does not catch it

    served = started(lambda: Dying(str(folder), dtype="float32"))

    async def go():
        with pytest.raises(EngineDeadError):
            await asyncio.wait_for(run_call(served, [[5, 6, 7]]), timeout=30)

    asyncio.run(go())
    served._thread.join(timeout=10)
    assert not served.is_alive
    with pytest.raises(EngineDeadError):
        asyncio.run(run_call(served, [[5, 6, 7]]))


def test_leaving_a_stream_early_aborts_and_frees_its_blocks(folder):
    served = started(lambda: Engine(str(folder), dtype="float32"))
    try:
        async def go():
            params = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)
            stream = served.generate([[5, 6, 7, 8, 9]], params)
            async for _ in stream:
                break  # the consumer goes away; nobody calls abort() by hand
            for _ in range(100):
                await asyncio.sleep(0.05)
                s = served.stats()
                if s["running"] == 0 and s["kv_blocks_used"] == 0:
                    return s
            return served.stats()

        stats = asyncio.run(go())
        assert stats["running"] == 0 and stats["kv_blocks_used"] == 0
    finally:
        served.shutdown()


class Slow(Engine):
    def step(self):
        import time

        time.sleep(0.01)
        return super().step()


def test_fail_all_ends_every_call_in_flight_with_the_given_error(folder):
    served = started(lambda: Slow(str(folder), dtype="float32"))
    try:
        async def go():
            params = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)
            calls = [asyncio.create_task(run_call(served, [[5, 6, 7]], params)) for _ in range(3)]
            while served.stats()["running"] < 3:
                await asyncio.sleep(0.01)
            assert served.fail_all(EngineError("shutting down for the test")) == 3
            results = await asyncio.gather(*calls, return_exceptions=True)
            return results

        results = asyncio.run(go())
        assert all(isinstance(r, EngineError) and "for the test" in str(r) for r in results)
    finally:
        served.shutdown()
