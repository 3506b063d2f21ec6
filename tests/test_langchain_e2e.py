"""LangChain's ChatOpenAI against `tuili serve`: bind_tools with tool_choice="any" and
with_structured_output(PydanticModel, method="json_schema")."""
from __future__ import annotations

from typing import Literal

import pytest
from pydantic import BaseModel, Field

from server_util import running_server

MODEL = "smollm2-135m-instruct"


class City(BaseModel):
    """A city and the country it is in."""

    name: str = Field(max_length=30)
    country: str = Field(max_length=30)
    size: Literal["small", "medium", "large"]


@pytest.fixture(scope="module")
def chat(default_model_folder):
    from langchain_openai import ChatOpenAI

    with running_server("--dtype", "float32", "--kv-cache-memory", "256MiB") as (base, _):
        yield ChatOpenAI(model=MODEL, base_url=base + "/v1", api_key="x", temperature=0, max_tokens=120,
                         max_retries=0)


def test_bind_tools_any_returns_a_valid_call(chat):
    from langchain_core.tools import tool

    class WeatherArgs(BaseModel):
        city: str = Field(max_length=30)  # bounded, so a 135M model's greedy string cannot run on
        unit: Literal["celsius", "fahrenheit"]

    @tool(args_schema=WeatherArgs)
    def get_weather(city: str, unit: Literal["celsius", "fahrenheit"]) -> str:
        """Current weather in a city."""
        return "sunny"

    msg = chat.bind_tools([get_weather], tool_choice="any").invoke("What is the weather in Paris?")
    assert msg.tool_calls, msg
    call = msg.tool_calls[0]
    # the schema LangChain sends allows extra properties (no additionalProperties: false)
    assert call["name"] == "get_weather" and {"city", "unit"} <= set(call["args"])
    assert call["args"]["unit"] in ("celsius", "fahrenheit") and call["id"].startswith("call_")


def test_with_structured_output_json_schema(chat):
    city = chat.with_structured_output(City, method="json_schema").invoke("Describe Paris.")
    assert isinstance(city, City) and city.name
