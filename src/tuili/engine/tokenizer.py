"""Tokenizers: loaded one way everywhere, chat templates applied one way everywhere.

- A plain fast tokenizer (tokenizer.json + tokenizer_config.json, chat template included)
  loads through `PreTrainedTokenizerFast` without AutoTokenizer's import of model configs
  and modules: about 3 s less start-up on a 2-core CPU. Other tokenizer classes keep
  AutoTokenizer's choice.
- Hugging Face fast tokenizers must not be shared across threads, so each thread that
  tokenizes (the server's event loop, the engine loop) loads its own instance.
- `max_token_chars` bounds how many characters one token can cover, so a prompt can be
  refused as too long for the context without tokenizing all of it.
- Tools: a chat template that speaks of `tools` gets them (and assistant `tool_calls`,
  `tool` messages) in Hugging Face's convention, so a model renders its own tool format.
  A template without tools (SmolLM2's) gets the generic format below: a system message
  listing the functions in `<tools>` and asking for calls as
  `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>` (the Hermes/Qwen
  convention), earlier calls written back in that form, and tool results sent as a user
  turn of `<tool_response>` blocks. The server's tool-call grammar and parser
  (serve/tools.py) use the same form.
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


TOOL_CALL_START, TOOL_CALL_END = "<tool_call>\n", "\n</tool_call>"

GENERIC_TOOLS_PROMPT = (
    "You can call functions to help with the user's request. The functions are listed in "
    "JSON inside <tools></tools>:\n<tools>\n{tools}\n</tools>\n\n"
    "To call a function, answer with one JSON object per call, each inside <tool_call></tool_call>:\n"
    "<tool_call>\n{{\"name\": <function name>, \"arguments\": <arguments as a JSON object>}}\n</tool_call>")


def tool_call_text(name: str, arguments: Any) -> str:
    """One call in the generic format, JSON written compactly as the grammar writes it."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            pass
    args = arguments if isinstance(arguments, str) else json.dumps(arguments, separators=(",", ":"),
                                                                    ensure_ascii=False)
    return f'{TOOL_CALL_START}{{"name": {json.dumps(name, ensure_ascii=False)}, "arguments": {args}}}{TOOL_CALL_END}'


def template_knows_tools(tokenizer) -> bool:
    template = getattr(tokenizer, "chat_template", None) or ""
    return isinstance(template, str) and "tools" in template


def generic_tool_messages(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """The conversation in the generic tool format, for a template that has none."""
    out: list[dict[str, Any]] = []
    for m in messages:
        role, content = m.get("role"), m.get("content") or ""
        if role == "assistant" and m.get("tool_calls"):
            calls = "\n".join(tool_call_text(c["function"]["name"], c["function"].get("arguments", {}))
                              for c in m["tool_calls"])
            out.append({"role": "assistant", "content": f"{content}\n{calls}" if content else calls})
        elif role == "tool":
            block = f"<tool_response>\n{content}\n</tool_response>"
            if out and out[-1].get("_tool_results"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool_results": True})
        else:
            out.append({"role": role, "content": content})
    for m in out:
        m.pop("_tool_results", None)
    if tools:
        listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        prompt = GENERIC_TOOLS_PROMPT.format(tools=listing)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{prompt}" if out[0]["content"] else prompt}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def chat_prompt_ids(tokenizer, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    model_name: str = "this model", tools: list[dict[str, Any]] | None = None) -> list[int]:
    """Token ids of a conversation through the model's chat template. Raises ValueError
    naming `messages` when there is no template or the template rejects the messages."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"messages: {model_name} has no chat template; use /v1/completions")
    kwargs: dict[str, Any] = {}
    uses_tools = bool(tools) or any(m.get("tool_calls") or m.get("role") == "tool" for m in messages)
    if uses_tools and template_knows_tools(tokenizer):
        if tools:
            kwargs["tools"] = tools
    elif uses_tools:
        messages = generic_tool_messages(messages, tools)
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             **kwargs)
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
