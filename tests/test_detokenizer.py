"""Incremental detokenization, stop strings and the held-back text, token by token.

Tokens are fed one at a time through the engine's postprocessor, as steps would, with the
default model's real tokenizer; the deltas handed out must add up to the final text, never
show half a character, and never show any part of a matched stop string.
"""
import pytest

from tuili.engine.postprocess import Postprocessor, take_delta
from tuili.engine.sequence import Sequence
from tuili.engine.tokenizer import load_tokenizer
from tuili.sampling import SamplingParams


@pytest.fixture(scope="module")
def tok(default_model_folder):
    return load_tokenizer(default_model_folder)


def feed(tok, text: str, params: SamplingParams, prompt: str = "Say:"):
    """Feed `text`'s tokens one per step; returns (the deltas' texts, the sequence)."""
    prompt_ids = tok(prompt).input_ids
    ids = tok(text, add_special_tokens=False).input_ids
    seq = Sequence("r", 0, prompt_ids, params)
    post = Postprocessor(tok, eos_token_ids=[], max_seq_len=10_000)
    deltas = []
    for t in ids:
        finished = post.append(seq, t, None, 0.0)
        deltas.append(take_delta(seq, finished).text)
        if finished:
            break
    else:
        seq.finish_reason = "length"
        deltas.append(take_delta(seq, True).text)
    return deltas, seq


def test_multibyte_characters_split_across_tokens_appear_once_and_whole(tok):
    text = "Emoji 🙂🚀 and 日本語 and ñandú."
    ids = tok(text, add_special_tokens=False).input_ids
    pieces = [tok.decode([t]) for t in ids]
    assert any("\ufffd" in p for p in pieces), "the text no longer splits a character across tokens"
    deltas, seq = feed(tok, text, SamplingParams(max_tokens=1000))
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text


def test_a_stop_string_split_across_steps_is_cut_and_never_shown(tok):
    text = "One two three. The end is near, they said."
    deltas, seq = feed(tok, text, SamplingParams(max_tokens=1000, stop=["The end"]))
    assert seq.finish_reason == "stop" and seq.stop_reason == "The end"
    shown = "".join(deltas)
    assert shown == "One two three. "
    assert not any("The" in d for d in deltas)


def test_a_partial_stop_string_is_held_back_then_released(tok):
    text = "The cat sat on the mat and then the dog sat too."
    stop = "the dog ran"
    seq = Sequence("r", 0, tok("Say:").input_ids, SamplingParams(max_tokens=1000, stop=[stop]))
    post = Postprocessor(tok, eos_token_ids=[], max_seq_len=10_000)
    shown = ""
    held_while_partial = False
    for t in tok(text, add_special_tokens=False).input_ids:
        assert not post.append(seq, t, None, 0.0)
        shown += take_delta(seq, False).text
        # Never ahead of what might still be the start of the stop string.
        assert len(shown) <= max(len(seq.text) - (len(stop) - 1), 0)
        held_while_partial |= seq.text.endswith("the dog") and not shown.endswith("the dog")
    assert held_while_partial  # "the dog" could have become "the dog ran": it waited
    seq.finish_reason = "length"
    shown += take_delta(seq, True).text
    assert shown == text  # what was held back came out once the sequence ended


def test_deltas_hand_out_each_token_id_once(tok):
    deltas_ids = []
    prompt_ids = tok("Hi").input_ids
    seq = Sequence("r", 0, prompt_ids, SamplingParams(max_tokens=5))
    post = Postprocessor(tok, eos_token_ids=[], max_seq_len=10_000)
    for t in tok("a b c d e", add_special_tokens=False).input_ids:
        finished = post.append(seq, t, None, 0.0)
        deltas_ids.append(take_delta(seq, finished).token_ids)
    assert [len(d) for d in deltas_ids] == [1] * len(deltas_ids)
    assert sum(deltas_ids, []) == seq.output_token_ids
