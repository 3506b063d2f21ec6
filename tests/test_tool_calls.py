"""Tool calling: the parser (streamed pieces reassemble to the whole), the generic chat
format, and the official openai client against `tuili serve`."""
from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from server_util import running_server
from tuili.engine import tokenizer as engine_tok
from tuili.serve import tools as T

MODEL = "smollm2-135m-instruct"
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
ADD = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
       "required": ["a", "b"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "add", "description": "Add two integers", "parameters": ADD}}]
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def _run(parser_text_pieces):
    p = T.ToolParser()
    events = [e for piece in parser_text_pieces for e in p.feed(piece)] + p.finish()
    return events, p


def test_format_matches_the_chat_template_generic_format():
    assert engine_tok.TOOL_CALL_START == T.START + "\n" and engine_tok.TOOL_CALL_END == "\n" + T.END
    text = engine_tok.tool_call_text("add", '{"a": 1, "b": 2}')
    _, p = _run([text])
    assert p.calls[0]["name"] == "add" and json.loads(p.calls[0]["arguments"]) == {"a": 1, "b": 2}


@pytest.mark.parametrize("text", [
    'Sure.\n<tool_call>\n{"name": "add", "arguments": {"a":1,"b":{"c":[2,"}"]}}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_weather", "arguments": {"city":"Paris","unit":"celsius"}}\n</tool_call>',
    'no call here, just {"a": 1} and a < sign',
    '<tool_call>\n{"arguments": {"a": 1, "b": 2}, "name": "add"}\n</tool_call>',
    '<tool_call>\nnot json\n</tool_call> after',
    '<tool_call>\n{"name": "add", "arguments": {"a":1,',  # cut by max_tokens
])
def test_streamed_pieces_reassemble_to_the_whole(text):
    whole, pw = _run([text])
    for size in (1, 2, 3, 7):
        events, p = _run([text[i:i + size] for i in range(0, len(text), size)])
        assert [(c["name"], c["arguments"]) for c in p.calls] == [(c["name"], c["arguments"]) for c in pw.calls]
        assert "".join(e.text for e in events if e.kind == "content") == \
               "".join(e.text for e in whole if e.kind == "content")
        firsts = {}
        for e in events:  # a call's id and name come before its argument pieces
            if e.kind == "call":
                firsts[e.index] = True
            if e.kind == "arguments":
                assert firsts.get(e.index)


def test_parsed_calls_and_content():
    msg, reason = T.message('Sure.\n<tool_call>\n{"name": "add", "arguments": {"a":1,"b":2}}\n</tool_call>', "stop")
    assert msg["content"] == "Sure." and reason == "tool_calls"
    call = msg["tool_calls"][0]
    assert call["id"].startswith("call_") and call["type"] == "function"
    assert json.loads(call["function"]["arguments"]) == {"a": 1, "b": 2}
    msg, reason = T.message("plain answer", "stop")
    assert msg == {"role": "assistant", "content": "plain answer"} and reason == "stop"
    msg, _ = T.message("<tool_call>\nnot json\n</tool_call>", "stop")
    assert "tool_calls" not in msg and msg["content"] == "<tool_call>\nnot json\n</tool_call>"


def test_generic_template_messages():
    msgs = engine_tok.generic_tool_messages(
        [{"role": "user", "content": "hi"},
         {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "add", "arguments": {"a": 1}}}]},
         {"role": "tool", "content": "3"}, {"role": "tool", "content": "4"}], TOOLS)
    assert msgs[0]["role"] == "system" and '"name": "get_weather"' in msgs[0]["content"]
    assert msgs[2] == {"role": "assistant", "content": '<tool_call>\n{"name": "add", "arguments": {"a":1}}\n</tool_call>'}
    assert msgs[3]["role"] == "user" and msgs[3]["content"].count("<tool_response>") == 2


# ---- against the server ---------------------------------------------------------
@pytest.fixture(scope="module")
def client(default_model_folder):
    with running_server("--dtype", "float32", "--kv-cache-memory", "256MiB") as (base, _):
        yield openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)


def _valid(calls, names=("get_weather", "add")):
    assert calls
    for c in calls:
        assert c.id.startswith("call_") and c.type == "function" and c.function.name in names
        jsonschema.validate(json.loads(c.function.arguments), SCHEMAS[c.function.name])


def test_required_and_named_always_give_valid_calls(client):
    for seed in range(3):
        r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                           temperature=1.0, seed=seed, max_tokens=200)
        assert r.choices[0].finish_reason == "tool_calls"
        _valid(r.choices[0].message.tool_calls)
        r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, temperature=1.0, seed=seed,
                                           tool_choice={"type": "function", "function": {"name": "add"}},
                                           parallel_tool_calls=False, max_tokens=200)
        calls = r.choices[0].message.tool_calls
        assert len(calls) == 1 and r.choices[0].finish_reason == "tool_calls"
        _valid(calls, ("add",))


def test_streamed_tool_calls_reassemble_to_the_non_streamed_under_greedy(client):
    kw = dict(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", temperature=0.0, max_tokens=200)
    whole = client.chat.completions.create(**kw).choices[0]
    calls: dict[int, dict] = {}
    reason = None
    for chunk in client.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            reason = c.finish_reason or reason
            for d in c.delta.tool_calls or []:
                entry = calls.setdefault(d.index, {"id": None, "name": None, "arguments": ""})
                if d.id:
                    assert entry["id"] is None and entry["arguments"] == ""  # id and name first
                    entry["id"], entry["name"] = d.id, d.function.name
                entry["arguments"] += d.function.arguments or ""
    assert reason == whole.finish_reason == "tool_calls"
    assert [(c["name"], c["arguments"]) for _, c in sorted(calls.items())] == \
           [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]


def test_tool_result_yields_an_answer_and_none_never_calls(client):
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS,
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                       temperature=0.0, max_tokens=100)
    m = r.choices[0].message
    follow = ASK + [m.model_dump(exclude_none=True),
                    {"role": "tool", "tool_call_id": m.tool_calls[0].id, "content": '{"temperature_c": 21}'}]
    answer = client.chat.completions.create(model=MODEL, messages=follow, tools=TOOLS, tool_choice="none",
                                            temperature=0.0, max_tokens=60).choices[0]
    assert answer.message.content and not answer.message.tool_calls and answer.finish_reason in ("stop", "length")
    for seed in range(3):
        c = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="none", seed=seed,
                                           max_tokens=40).choices[0]
        assert not c.message.tool_calls and c.finish_reason != "tool_calls"


def test_bad_tool_input_is_a_400_naming_the_field(client):
    cases = [
        (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice"),
        (dict(tool_choice="required"), "tool_choice"),
        (dict(tools=[{"type": "function", "function": {"name": "has space"}}]), "tools.0.function.name"),
        (dict(tools=[{"type": "retrieval", "function": {"name": "f"}}]), "tools.0.type"),
        (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}]),
         "tools.0.function.parameters"),
        (dict(tools=TOOLS + [TOOLS[0]]), "tools.2.function.name"),
        (dict(tools=TOOLS, tool_choice="required", response_format={"type": "json_object"}), "response_format"),
    ]
    for kw, param in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4, **kw)
        assert e.value.body["param"] == param, (kw, e.value.body)
