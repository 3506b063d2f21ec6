"""After sampling: append each new token, decide whether its sequence stops, hand out deltas.

Stop rules, in order, once `min_tokens` are out: EOS (unless `ignore_eos`), a stop token
id, a stop string ending in the new text (the text is cut before it); then `max_tokens`
or the longest sequence the engine allows ("length"). Output token ids include a final
EOS or stop token id; the text never does, and never includes a matched stop string.

A sequence remembers how much it has handed out (`sent_*`), so each delta carries only
what is new; text that might be the start of a stop string is held back until it is
known not to be one (or the sequence finishes).
"""
from __future__ import annotations

from .detokenizer import find_stop, update_text
from .outputs import CompletionDelta, TokenLogprob
from .sequence import Sequence


class Postprocessor:
    def __init__(self, tokenizer, eos_token_ids: list[int], max_seq_len: int):
        self.tokenizer = tokenizer
        self.eos_token_ids = set(eos_token_ids)
        self.max_seq_len = max_seq_len

    def append(self, seq: Sequence, token: int, lp, now: float) -> bool:
        """Add a sampled token; returns True when the sequence has just finished (the caller
        then tells the scheduler)."""
        seq.append(token)
        if seq.first_token_time is None:
            seq.first_token_time = now
        if lp is not None:
            seq.pending_logprobs.append(TokenLogprob(token, lp[0], lp[1]))
        p = seq.params
        delta = update_text(self.tokenizer, seq, p.skip_special_tokens)
        n_out = seq.num_output_tokens
        reason, stop = None, None
        if n_out >= p.min_tokens:
            if token in self.eos_token_ids and not p.ignore_eos:
                reason = "stop"
            elif token in p.stop_token_ids:
                reason, stop = "stop", token
            elif p.stop and delta:
                hit = find_stop(seq.text, len(delta), p.stop)
                if hit is not None:
                    seq.text = seq.text[: hit[0]]
                    reason, stop = "stop", hit[1]
        if reason is None and ((p.max_tokens is not None and n_out >= p.max_tokens)
                               or seq.num_tokens >= self.max_seq_len):
            reason = "length"
        if reason is None:
            return False
        if reason == "length":
            update_text(self.tokenizer, seq, p.skip_special_tokens, final=True)
        seq.finish_reason, seq.stop_reason = reason, stop
        return True


def take_delta(seq: Sequence, finished: bool) -> CompletionDelta:
    """What `seq` gained since its last delta; marks it handed out."""
    stops = seq.params.stop
    end = len(seq.text)
    if not finished and stops:
        end = max(end - (max(len(s) for s in stops) - 1), seq.sent_text)
    text = seq.text[seq.sent_text:end]
    seq.sent_text = end
    ids = seq.token_ids[seq.num_prompt_tokens + seq.sent_tokens:]
    seq.sent_tokens += len(ids)
    logprobs = None
    if seq.params.logprobs is not None:
        logprobs, seq.pending_logprobs = seq.pending_logprobs, []
    report = finished and not seq.sent_finish  # the finish reason travels once
    seq.sent_finish = seq.sent_finish or finished
    return CompletionDelta(seq.index, text, ids, logprobs,
                           seq.finish_reason if report else None, seq.stop_reason if report else None)
