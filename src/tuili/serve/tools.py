"""Tool calling: definitions -> a grammar, the model's tool-call text -> OpenAI's tool_calls.

The tool-call format is the generic one the chat template gets when a model's own template
has none (engine/tokenizer.py, the Hermes/Qwen convention):

    <tool_call>
    {"name": "get_weather", "arguments": {"city":"Paris"}}
    </tool_call>

Decisions:
- tool_choice "required" or a named function: a Lark grammar forces one call (or, with
  `parallel_tool_calls`, up to MAX_PARALLEL_CALLS calls separated by a newline) of the
  allowed functions, each call's arguments constrained by the function's `parameters`
  schema (compact JSON). "auto": the text is free and calls are parsed out of it; text
  that only looks like a call but is not one stays content. "none": nothing is parsed.
- One incremental parser serves both forms of a response: the non-streamed message is the
  parser fed the whole text, the stream is the same parser fed each delta, so streamed
  deltas reassemble to exactly the non-streamed calls. Arguments stream as they grow; the
  parser holds back only what could still turn out to be the call's closing `}` or the
  end tag.
- Ids are `call_` and 24 random hex digits; `finish_reason` is "tool_calls" when a call was
  made and the model stopped by itself (a call cut by max_tokens keeps "length").
"""
from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from ..sampling import GuidedDecoding
from . import responses as R
from .protocol import ChatCompletionRequest, Tool

# Must match engine/tokenizer.py's generic format (a test checks they agree).
START, END = "<tool_call>", "</tool_call>"
MAX_PARALLEL_CALLS = 8
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"([^"\\]*)"\s*,\s*"arguments"\s*:\s*(?=\S)')
_COMPACT = {"whitespace_flexible": False}


# ---- definitions -> grammar ------------------------------------------------------
def parameter_constraints(tools: list[Tool]) -> list[GuidedDecoding]:
    """Each tool's parameters as a JSON-schema constraint, so a schema the grammar library
    cannot compile is a 400 naming `tools.<i>.function.parameters`."""
    return [GuidedDecoding("json", t.parameters, f"tools.{i}.function.parameters") for i, t in enumerate(tools)]


def forced_grammar(tools: list[Tool], choice: str, parallel: bool) -> GuidedDecoding:
    """The Lark grammar for tool_choice "required" (any of `tools`) or a function's name."""
    chosen = tools if choice == "required" else [t for t in tools if t.function.name == choice]
    rules = []
    for i, t in enumerate(chosen):
        schema = dict(t.parameters)
        schema["x-guidance"] = {**schema.get("x-guidance", {}), **_COMPACT} if isinstance(
            schema.get("x-guidance"), dict) else _COMPACT
        head = json.dumps(f'{START}\n{{"name": "{t.function.name}", "arguments": ')
        tail = json.dumps(f"}}\n{END}")
        rules.append(f"fn_{i}: {head} args_{i} {tail}\nargs_{i}: %json {json.dumps(schema)}")
    alternatives = " | ".join(f"fn_{i}" for i in range(len(chosen)))
    repeat = f' ("\\n" tool_call){{0,{MAX_PARALLEL_CALLS - 1}}}' if parallel else ""
    text = f"start: tool_call{repeat}\ntool_call: {alternatives}\n" + "\n".join(rules) + "\n"
    return GuidedDecoding("lark", text, "tools")


def prompt_tools(req: ChatCompletionRequest) -> list[dict[str, Any]] | None:
    """Tools as the chat template sees them; none with tool_choice "none"."""
    if not req.tools or req.effective_tool_choice == "none":
        return None
    return [t.as_dict() for t in req.tools]


# ---- text -> calls -----------------------------------------------------------------
@dataclass
class ToolEvent:
    kind: str  # "content", "call" (text: the function's name; id set) or "arguments"
    text: str
    index: int = 0
    id: str | None = None


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-k:]):
            return k
    return 0


def _args_end(text: str) -> int:
    """Where a call's arguments end in `text` (the call's body after `"arguments": `): before
    trailing whitespace, the object's closing brace and whitespace."""
    j = len(text.rstrip())
    if j and text[j - 1] == "}":
        j -= 1
    return len(text[:j].rstrip())


@dataclass
class ToolParser:
    """Incremental: `feed` each piece of text, then `finish`; each returns ToolEvents."""

    buf: str = ""
    state: str = "text"  # "text", "head" (inside <tool_call>, before the arguments), "args"
    calls: list[dict[str, Any]] = field(default_factory=list)
    sent: int = 0  # characters of the current call's arguments handed out
    after_call: bool = False

    def feed(self, text: str) -> list[ToolEvent]:
        self.buf += text
        out: list[ToolEvent] = []
        while self._advance(out):
            pass
        return out

    def finish(self) -> list[ToolEvent]:
        out: list[ToolEvent] = []
        if self.state == "text":
            rest = self.buf.rstrip() if self.calls else self.buf
            if self.after_call:
                rest = rest.lstrip()
            self._content(out, rest)
        elif self.state == "head":
            self._content(out, START + self.buf)
        else:  # arguments cut short (max_tokens)
            self._arguments(out, self.buf[self.sent:_args_end(self.buf)])
        self.buf, self.state = "", "text"
        return out

    def _advance(self, out: list[ToolEvent]) -> bool:
        if self.state == "text":
            if self.after_call:
                self.buf = self.buf.lstrip()
                if not self.buf:
                    return False
            k = self.buf.find(START)
            if k >= 0:
                self._content(out, self.buf[:k].rstrip())
                self.buf, self.state = self.buf[k + len(START):], "head"
                return True
            j = len(self.buf) - _partial_suffix(self.buf, START)
            j = len(self.buf[:j].rstrip())  # whitespace waits: it may sit before a call
            self._content(out, self.buf[:j])
            self.buf = self.buf[j:]
            return False
        if self.state == "head":
            m = _HEAD.match(self.buf)
            if m:
                self._call(out, m.group(1))
                self.buf, self.state, self.sent = self.buf[m.end():], "args", 0
                return True
            e = self.buf.find(END)
            if e < 0:
                return False
            self._whole_block(out, self.buf[:e])
            self.buf, self.state, self.after_call = self.buf[e + len(END):], "text", True
            return True
        e = self.buf.find(END)
        if e >= 0:
            self._arguments(out, self.buf[self.sent:_args_end(self.buf[:e])])
            self.buf, self.state, self.after_call = self.buf[e + len(END):], "text", True
            return True
        j = _args_end(self.buf[:len(self.buf) - _partial_suffix(self.buf, END)])
        if j > self.sent:
            self._arguments(out, self.buf[self.sent:j])
            self.sent = j
        return False

    def _whole_block(self, out: list[ToolEvent], block: str) -> None:
        """A block that did not start in the usual key order: a call if it is a JSON object
        with a name and arguments (or parameters), else content."""
        try:
            obj = json.loads(block)
        except (ValueError, RecursionError):
            obj = None
        args = obj.get("arguments", obj.get("parameters")) if isinstance(obj, dict) else None
        if isinstance(obj, dict) and isinstance(obj.get("name"), str) and isinstance(args, (dict, str)):
            self._call(out, obj["name"])
            self._arguments(out, args if isinstance(args, str) else json.dumps(args, ensure_ascii=False))
        else:
            self._content(out, f"{START}{block}{END}")

    def _content(self, out: list[ToolEvent], text: str) -> None:
        if text:
            out.append(ToolEvent("content", text))
            self.after_call = False

    def _call(self, out: list[ToolEvent], name: str) -> None:
        call = {"id": f"call_{secrets.token_hex(12)}", "name": name, "arguments": ""}
        self.calls.append(call)
        out.append(ToolEvent("call", name, len(self.calls) - 1, call["id"]))

    def _arguments(self, out: list[ToolEvent], text: str) -> None:
        if text and self.calls:
            self.calls[-1]["arguments"] += text
            out.append(ToolEvent("arguments", text, len(self.calls) - 1))


def tool_calls_json(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
            for c in calls]


def message(text: str, reason: str | None) -> tuple[dict[str, Any], str]:
    """The non-streamed assistant message and finish reason for a tool-enabled choice."""
    parser = ToolParser()
    events = parser.feed(text) + parser.finish()
    content = "".join(e.text for e in events if e.kind == "content")
    msg: dict[str, Any] = {"role": "assistant", "content": content or None}
    if parser.calls:
        msg["tool_calls"] = tool_calls_json(parser.calls)
    return msg, finish_reason(reason, bool(parser.calls))


def finish_reason(reason: str | None, called: bool) -> str:
    mapped = R.finish_reason(reason)
    return "tool_calls" if called and mapped == "stop" else mapped


def event_delta(e: ToolEvent) -> dict[str, Any]:
    """One parser event as a chat.completion.chunk delta (OpenAI's tool_call delta form:
    index, id, type and name first, then argument pieces)."""
    if e.kind == "content":
        return {"content": e.text}
    if e.kind == "call":
        return {"tool_calls": [{"index": e.index, "id": e.id, "type": "function",
                                "function": {"name": e.text, "arguments": ""}}]}
    return {"tool_calls": [{"index": e.index, "function": {"arguments": e.text}}]}


async def chat_tool_events(call, include_usage: bool) -> AsyncIterator[dict]:
    """calls.chat_events for a request whose tool calls are parsed (tool_choice not "none")."""
    tok = R.TokenText(call.served.tokenizer)
    model = call.served.name
    parsers = {j: ToolParser() for j in range(call.params.n)}
    for j in range(call.params.n):
        yield R.chat_chunk(call.rid, call.created, model, j, {"role": "assistant", "content": None}, None, None)
    async for _, delta in call.deltas():
        for c in delta.outputs:
            parser = parsers[c.index]
            events = parser.feed(c.text) if c.text else []
            if c.finish_reason is not None:
                events += parser.finish()
            lp = R.chat_logprobs(c.logprobs, tok) if c.logprobs else None
            for e in events:
                yield R.chat_chunk(call.rid, call.created, model, c.index, event_delta(e), lp, None)
                lp = None
            if lp:
                yield R.chat_chunk(call.rid, call.created, model, c.index, {}, lp, None)
            if c.finish_reason is not None:
                yield R.chat_chunk(call.rid, call.created, model, c.index, {}, None,
                                   finish_reason(c.finish_reason, bool(parser.calls)))
    if include_usage:
        yield R.usage_chunk(call.rid, call.created, model, "chat.completion.chunk", R.usage(*R.totals(call.outputs)))
