"""OpenAI request models (pydantic) and their translation into SamplingParams.

Decisions:
- Strict types: a number or boolean field given a string (or a boolean given to a number)
  is a 400 naming the field, as OpenAI answers, not a silent coercion; NaN and infinities
  are refused.
- Unknown fields are ignored, as OpenAI-compatible servers commonly do, so clients that
  send newer fields keep working; fields we know but cannot honour (suffix, best_of > n)
  get a 400 that names them.
- Structured output: `response_format` (text, json_object, json_schema), vLLM's
  `structured_outputs` {json, regex, choice, grammar, json_object} and its older
  `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar` become one
  `GuidedDecoding`; more than one constraint in a request is a 400. `logit_bias` (token id
  strings -> [-100, 100]) goes to the same masking path in the sampler.
- Tools: definitions are checked here (type "function", a name of letters, digits, `_`
  and `-` up to 64, parameters an object); `tool_choice` "required" or a named function
  becomes a grammar over the tool-call format (tools.py); "auto" parses calls from free text;
  "none" leaves the tools out of the prompt.
- `max_completion_tokens` wins over `max_tokens`; with neither, a completion may run to the
  end of the context window (chat) or 16 tokens (legacy completions, OpenAI's default).
- Sampling defaults follow OpenAI: temperature 1, top_p 1.
- vLLM's extras are accepted: top_k, min_p, repetition_penalty, min_tokens, ignore_eos,
  stop_token_ids, skip_special_tokens.
"""
from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..sampling import GuidedDecoding, SamplingParams


_STRICT = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool = False


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs`: exactly one of these."""

    model_config = _STRICT
    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


def _json_schema(value: dict[str, Any] | str, field: str) -> dict[str, Any]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):
            raise ValueError(f"{field}: not valid JSON") from None
    if not isinstance(value, dict):
        raise ValueError(f"{field}: must be a JSON schema object")
    return value


class _Base(BaseModel):
    model_config = _STRICT

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = Field(default=1, ge=1, le=128)  # OpenAI's bound; each completion is a sequence
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM extras
    top_k: int | None = None
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    def _check_unsupported(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed when stream is true")

    def _logit_bias(self) -> dict[int, float] | None:
        if not self.logit_bias:
            return None
        out: dict[int, float] = {}
        for key, bias in self.logit_bias.items():
            if not key.strip().isdigit():
                raise ValueError(f"logit_bias: keys must be token ids (integer strings), got {key!r}")
            out[int(key)] = bias
        return out

    def _extras_guided(self) -> list[GuidedDecoding]:
        """The constraints given through vLLM's extras (a list: more than one is an error)."""
        found: list[GuidedDecoding] = []
        so = self.structured_outputs
        if so is not None:
            if so.json_ is not None:
                found.append(GuidedDecoding("json", _json_schema(so.json_, "structured_outputs.json"),
                                            "structured_outputs.json"))
            if so.regex is not None:
                found.append(GuidedDecoding("regex", so.regex, "structured_outputs.regex"))
            if so.choice is not None:
                found.append(GuidedDecoding("choice", so.choice, "structured_outputs.choice"))
            if so.grammar is not None:
                found.append(GuidedDecoding("grammar", so.grammar, "structured_outputs.grammar"))
            if so.json_object:
                found.append(GuidedDecoding("json_object", None, "structured_outputs.json_object"))
        if self.guided_json is not None:
            found.append(GuidedDecoding("json", _json_schema(self.guided_json, "guided_json"), "guided_json"))
        if self.guided_regex is not None:
            found.append(GuidedDecoding("regex", self.guided_regex, "guided_regex"))
        if self.guided_choice is not None:
            found.append(GuidedDecoding("choice", self.guided_choice, "guided_choice"))
        if self.guided_grammar is not None:
            found.append(GuidedDecoding("grammar", self.guided_grammar, "guided_grammar"))
        return found

    @staticmethod
    def _one(found: list[GuidedDecoding]) -> GuidedDecoding | None:
        if len(found) > 1:
            names = ", ".join(g.field for g in found)
            raise ValueError(f"{found[1].field}: only one output constraint per request (got {names})")
        return found[0] if found else None

    def _sampling(self, max_tokens: int | None, logprobs: int | None,
                  guided: GuidedDecoding | None = None) -> SamplingParams:
        return SamplingParams(guided=guided, logit_bias=self._logit_bias(),
            n=self.n, max_tokens=max_tokens, min_tokens=self.min_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=-1 if self.top_k is None else self.top_k, min_p=self.min_p, seed=self.seed,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty, stop=self.stop, stop_token_ids=self.stop_token_ids,
            ignore_eos=self.ignore_eos, logprobs=logprobs, skip_special_tokens=self.skip_special_tokens)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Base):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise ValueError("prompt: must not be empty")
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # one prompt of token ids
        return list(p)

    def to_sampling_params(self) -> SamplingParams:
        self._check_unsupported()
        if self.suffix:
            raise ValueError("suffix: not supported by this server")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of: only best_of equal to n is supported")
        return self._sampling(self.max_tokens, self.logprobs, self._one(self._extras_guided()))


class ContentPart(BaseModel):
    model_config = _STRICT
    type: Literal["text"]
    text: str


FUNCTION_NAME = r"^[a-zA-Z0-9_-]{1,64}$"


class FunctionCall(BaseModel):
    model_config = _STRICT
    name: str
    arguments: str = "{}"


class ToolCall(BaseModel):
    """A call in an assistant message sent back (OpenAI's shape)."""

    model_config = _STRICT
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = _STRICT
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    def as_template_dict(self) -> dict[str, Any]:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        role = "system" if self.role == "developer" else self.role
        out: dict[str, Any] = {"role": role, "content": content or ""}
        if self.tool_calls and self.role == "assistant":
            out["tool_calls"] = [{"id": c.id, "type": "function",
                                  "function": {"name": c.function.name, "arguments": _arguments(c.function.arguments)}}
                                 for c in self.tool_calls]
        if self.role == "tool" and self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


def _arguments(text: str) -> Any:
    """Arguments as an object for chat templates (Hugging Face's convention); kept as
    text when they are not JSON."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return text


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False, populate_by_name=True)
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = _STRICT
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchemaFormat | None = None

    def guided(self) -> GuidedDecoding | None:
        if self.type == "json_object":
            return GuidedDecoding("json_object", None, "response_format")
        if self.type == "json_schema":
            if self.json_schema is None:
                raise ValueError("response_format.json_schema: required when type is 'json_schema'")
            if self.json_schema.schema_ is None:
                return GuidedDecoding("json_object", None, "response_format.json_schema")
            return GuidedDecoding("json", self.json_schema.schema_, "response_format.json_schema.schema")
        return None


class FunctionDefinition(BaseModel):
    model_config = _STRICT
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    model_config = _STRICT
    type: Literal["function"]
    function: FunctionDefinition

    def as_dict(self) -> dict[str, Any]:
        """The definition as the prompt shows it (parameters default to an empty object)."""
        fn: dict[str, Any] = {"name": self.function.name}
        if self.function.description:
            fn["description"] = self.function.description
        fn["parameters"] = self.parameters
        return {"type": "function", "function": fn}

    @property
    def parameters(self) -> dict[str, Any]:
        return self.function.parameters if self.function.parameters is not None else {"type": "object",
                                                                                      "properties": {}}


class NamedFunction(BaseModel):
    model_config = _STRICT
    name: str


class NamedToolChoice(BaseModel):
    model_config = _STRICT
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_Base):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None
    add_generation_prompt: bool = True

    @property
    def effective_tool_choice(self) -> str:
        """"none", "auto", "required" or the forced function's name (checked against tools)."""
        choice = self.tool_choice
        if not self.tools:
            if choice is not None and choice != "none":
                raise ValueError("tool_choice: needs tools")
            return "none"
        if choice is None:
            return "auto"
        if isinstance(choice, NamedToolChoice):
            names = [t.function.name for t in self.tools]
            if choice.function.name not in names:
                raise ValueError(f"tool_choice: no function named {choice.function.name!r} in tools "
                                 f"({', '.join(names)})")
            return choice.function.name
        return choice

    def check_tools(self) -> None:
        names = [t.function.name for t in self.tools or []]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise ValueError(f"tools.{i}.function.name: {name!r} is defined twice")
        self.effective_tool_choice  # noqa: B018 - raises on a bad tool_choice

    def to_sampling_params(self, tool_grammar: GuidedDecoding | None = None) -> SamplingParams:
        """`tool_grammar`: the grammar forcing tool calls (tools.py), when tool_choice asks for one."""
        self._check_unsupported()
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: requires logprobs to be true")
        found = self._extras_guided()
        if self.response_format is not None:
            g = self.response_format.guided()
            if g is not None:
                found.insert(0, g)
        if tool_grammar is not None and found:
            raise ValueError(f"{found[0].field}: cannot be combined with tool_choice "
                             f"{self.tool_choice if isinstance(self.tool_choice, str) else 'naming a function'}")
        guided = tool_grammar or self._one(found)
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return self._sampling(max_tokens, (self.top_logprobs or 0) if self.logprobs else None, guided)
