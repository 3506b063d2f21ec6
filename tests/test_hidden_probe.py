"""SamplingParams.hidden_layer: the residual stream after L layers at the prompt's last token,
handed out once, with the request's first token (the router's probe reads it there).

Checked against transformers' `hidden_states[L]` on random-weight models of every
architecture variant, through chunked prefill, a prefix hit that leaves only the last
token to compute (a one-row step, which otherwise takes the fused decode stack), and a
batch where other requests run beside the probe."""
import pytest
import torch

from tuili import LLM, SamplingParams

LENGTHS = [5, 23, 11]


def reference(tiny_model, folder, prompt: list[int]) -> list[torch.Tensor]:
    model = tiny_model.hf(folder)
    with torch.no_grad():
        return [h[0, -1] for h in model(torch.tensor([prompt]), output_hidden_states=True).hidden_states]


def test_hidden_states_match_transformers(tiny_variant, tiny_model):
    folder = tiny_variant
    layers = tiny_model.config(folder)["num_hidden_layers"]
    prompts = tiny_model.prompts(folder, LENGTHS)
    llm = LLM(str(folder), dtype="float32", block_size=4, max_num_batched_tokens=8, num_kv_blocks=64)
    for depth in range(layers):  # transformers' last entry has the final norm applied; ours does not
        params = SamplingParams(temperature=0, max_tokens=3, hidden_layer=depth)
        busy = SamplingParams(temperature=0, max_tokens=6)  # a request without a probe beside it
        outs = llm.generate(prompts + [prompts[0][:3]], [params] * len(prompts) + [busy])
        assert outs[-1].hidden is None
        for prompt, out in zip(prompts, outs):
            ref = reference(tiny_model, folder, prompt)[depth]
            assert out.hidden is not None and len(out.hidden) == ref.numel()
            torch.testing.assert_close(torch.tensor(out.hidden), ref, rtol=1e-4, atol=1e-4)


def test_prefix_hit_still_yields_the_hidden_state(tiny_model):
    folder = tiny_model.variant("llama-gqa-untied")
    prompt = tiny_model.prompts(folder, [26])[0]
    llm = LLM(str(folder), dtype="float32", block_size=4, num_kv_blocks=64)
    params = SamplingParams(temperature=0, max_tokens=1, hidden_layer=2)
    first = llm.generate([prompt], params)[0]
    again = llm.generate([prompt], params)[0]
    assert again.num_cached_tokens >= 24  # only the last block's tokens were computed again
    ref = reference(tiny_model, folder, prompt)[2]
    for out in (first, again):
        torch.testing.assert_close(torch.tensor(out.hidden), ref, rtol=1e-4, atol=1e-4)


def test_hidden_layer_is_checked(tiny_model):
    folder = tiny_model.variant("llama-gqa-untied")
    llm = LLM(str(folder), dtype="float32")
    with pytest.raises(ValueError, match="hidden_layer"):
        llm.generate([[5, 6, 7]], SamplingParams(hidden_layer=99))
    with pytest.raises(ValueError, match="hidden_layer"):
        SamplingParams(hidden_layer=-1)


def test_hidden_state_comes_with_the_first_token(tiny_model):
    folder = tiny_model.variant("llama-gqa-untied")
    llm = LLM(str(folder), dtype="float32", block_size=4, max_num_batched_tokens=8)
    engine = llm.engine
    engine.add_request("r", tiny_model.prompts(folder, [19])[0], SamplingParams(max_tokens=4, hidden_layer=1,
                                                                                 ignore_eos=True))
    deltas = []
    while engine.has_unfinished_requests():
        deltas += engine.step()
    with_tokens = [d for d in deltas if any(c.token_ids for c in d.outputs)]
    assert len(with_tokens) == 4 and with_tokens[0].hidden is not None
    assert all(d.hidden is None for d in deltas if d is not with_tokens[0])
