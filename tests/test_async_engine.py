"""AsyncEngine.load: the engine is built, and stepped, in one thread (one OpenMP team per model)."""
import asyncio
import threading

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tuili import SamplingParams
from tuili.engine.async_engine import AsyncEngine
from tuili.engine.engine import Engine


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128))
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    return path


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
        async def run():
            params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
            last = None
            async for out in served.add("r1", [5, 6, 7, 8], params):
                last = out
            return last

        out = asyncio.run(run())
        assert out.finished and len(out.outputs[0].token_ids) == 5
        assert threads["step"] == {threads["build"]}
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
