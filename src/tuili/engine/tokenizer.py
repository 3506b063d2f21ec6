"""Tokenizers: loaded one way everywhere, chat templates applied one way everywhere.

- A plain fast tokenizer (tokenizer.json + tokenizer_config.json, chat template included)
  loads through `PreTrainedTokenizerFast` without AutoTokenizer's import of model configs
  and modules: about 3 s less start-up on a 2-core CPU. Other tokenizer classes keep
  AutoTokenizer's choice.
- Hugging Face fast tokenizers must not be shared across threads, so each thread that
  tokenizes (the server's event loop, the engine loop) loads its own instance.
- `max_token_chars` bounds how many characters one token can cover, so a prompt can be
  refused as too long for the context without tokenizing all of it.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("tuili.engine")

_PLAIN_FAST_TOKENIZERS = {None, "PreTrainedTokenizerFast", "TokenizersBackend", "GPT2Tokenizer", "GPT2TokenizerFast"}
_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def load_tokenizer(folder: str | Path | None, name: str = "model"):
    """The tokenizer of an HF folder, or None (with a warning) when the folder has none."""
    folder = Path(folder) if folder is not None else None
    if folder is None or not any((folder / n).exists() for n in _FILES):
        log.warning("model %s has no tokenizer files: only token-id prompts will work", name)
        return None
    config_path = folder / "tokenizer_config.json"
    tokenizer_class = json.loads(config_path.read_text()).get("tokenizer_class") if config_path.exists() else None
    if (folder / "tokenizer.json").exists() and tokenizer_class in _PLAIN_FAST_TOKENIZERS:
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(str(folder))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def chat_prompt_ids(tokenizer, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    model_name: str = "this model") -> list[int]:
    """Token ids of a conversation through the model's chat template. Raises ValueError
    naming `messages` when there is no template or the template rejects the messages."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"messages: {model_name} has no chat template; use /v1/completions")
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # noqa: BLE001 - template errors (e.g. role order) are the caller's input
        raise ValueError(f"messages: the chat template rejected them: {e}") from None
    return tokenizer(text, add_special_tokens=False).input_ids


def max_token_chars(tokenizer) -> int:
    """An upper bound on the characters one token decodes to.

    Byte-level BPE and SentencePiece vocabularies write each byte (or character) of a
    token as one character of its vocabulary entry, and a character is at least one byte,
    so the longest entry bounds every token's text."""
    if tokenizer is None:
        return 0
    return max((len(t) for t in tokenizer.get_vocab()), default=1)
