"""Large CPU buffers on 2 MB pages (model/hugepages.py): the packed weights and the KV cache."""
import pytest
import torch

from tuili.model import hugepages
from tuili.model.kernels import cpu_kernels

thp = pytest.mark.skipif(not hugepages.available(), reason="no transparent huge pages for madvise here")


@thp
def test_an_arena_holds_exact_copies_aligned_and_refuses_to_overflow():
    ts = [torch.randn(1000, 77).bfloat16(), torch.randint(-128, 127, (333,), dtype=torch.int8), torch.randn(5, 3, 16)]
    arena = hugepages.Arena(hugepages.arena_bytes(ts))
    copies = [arena.take(t) for t in ts]
    assert copies[0].data_ptr() % hugepages.PAGE == 0
    for t, c in zip(ts, copies):
        assert c.data_ptr() % 64 == 0 and c.shape == t.shape and c.dtype == t.dtype and torch.equal(c, t)
    copies[1].fill_(7)  # a copy owns its bytes: the others are untouched
    assert torch.equal(copies[0], ts[0]) and torch.equal(copies[2], ts[2])
    with pytest.raises(ValueError, match="full"):
        arena.empty((hugepages.PAGE,), torch.uint8)


@thp
def test_an_arena_comes_on_huge_pages_when_linux_lends_them():
    before = hugepages.process_huge_bytes()
    layout = [((8, 1024, 1024), torch.float32)]  # 32 MB, written once
    t = hugepages.arena_for(layout).empty(*layout[0]).zero_()
    assert t.data_ptr() % hugepages.PAGE == 0 and not t.any()
    t += 1
    assert t.sum() == t.numel()
    # Linux in madvise mode compacts memory for a mapping that asked: at least one 2 MB page
    assert hugepages.process_huge_bytes() - before >= hugepages.PAGE


@thp
@pytest.mark.skipif(cpu_kernels() is None or not cpu_kernels().gemm_available(), reason="no packed products here")
@pytest.mark.parametrize("quant,kv", [("none", "auto"), ("int8", "int8"), ("int4", "auto")])
def test_weights_and_caches_on_huge_pages_give_the_same_tokens_to_the_bit(tiny_model, monkeypatch, quant, kv):
    """The packed weights move into one mapping and the K/V caches into another; the tokens
    and logprobs are those of ordinary memory (TUILI_HUGEPAGES=0)."""
    import tuili.device
    from tuili import LLM, SamplingParams
    from tuili.model.quant import PackedInt4Weight, PackedWeight

    monkeypatch.setattr(tuili.device, "cpu_has_fast_bf16", lambda: False)  # the packed products
    # packed weights of 2.6 MB (int4) to 10 MB (bf16), 3-6 MB of K/V: past the one-page threshold
    folder = tiny_model("llama", vocab_size=2000, hidden_size=256, intermediate_size=2048, seed=5)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=2)
    prompts = [[5, 9, 17, 33, 2, 8], list(range(20, 47))]
    results = {}
    for setting in ("0", "1"):
        monkeypatch.setenv("TUILI_HUGEPAGES", setting)
        llm = LLM(str(folder), dtype="bfloat16", quantization=quant, kv_cache_dtype=kv, block_size=4,
                  num_kv_blocks=1024)
        model = llm.engine.model
        weights = [w for layer in model.layers
                   for w in (layer.qkv_weight, layer.o_weight, layer.gate_up_weight, layer.down_weight)]
        panels = [w.packed if isinstance(w, PackedWeight) else w.codes for w in weights + [model.lm_head]
                  if isinstance(w, (PackedWeight, PackedInt4Weight))]
        assert panels
        storages = {p.untyped_storage().data_ptr() for p in panels}
        caches = [t for layer in llm.engine.runner.kv_caches for t in layer]
        if setting == "1":  # one mapping for all panels, 2 MB aligned caches
            assert len(storages) == 1 and min(p.data_ptr() for p in panels) % hugepages.PAGE == 0
            assert len({t.untyped_storage().data_ptr() for t in caches}) == 1
            assert min(t.data_ptr() for t in caches) % hugepages.PAGE == 0
        else:
            assert len(storages) == len(panels)
        outs = llm.generate(prompts, params)
        results[setting] = [(o.outputs[0].token_ids, [(lp.logprob, lp.top) for lp in o.outputs[0].logprobs])
                            for o in outs]
    assert results["0"] == results["1"]


@thp
def test_less_than_a_page_in_all_stays_in_ordinary_memory():
    assert hugepages.arena_for([((100, 100), torch.float32)] * 10) is None  # 400 KB
    arena = hugepages.arena_for([((512, 1024), torch.float32)] * 2)  # 4 MB
    assert arena is not None and arena.nbytes >= 4 << 20


def test_the_switch_keeps_ordinary_memory(monkeypatch):
    from tuili.device import huge_pages_wanted

    monkeypatch.setenv("TUILI_HUGEPAGES", "0")
    assert not huge_pages_wanted(torch.device("cpu"))
    monkeypatch.delenv("TUILI_HUGEPAGES")
    assert huge_pages_wanted(torch.device("cpu")) and not huge_pages_wanted(torch.device("cuda"))
