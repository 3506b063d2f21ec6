"""The JSON schemas structured output is checked and measured on (tests/test_structured_output.py,
`python -m tuili.bench.structured`): nested objects, arrays with bounds, enums, anyOf, numbers
with bounds, string patterns, nullable fields, const, additionalProperties false."""
from __future__ import annotations

NAME = {"type": "string", "maxLength": 24}
SCHEMAS = {
    "flat": {"type": "object", "properties": {"name": NAME, "age": {"type": "integer"}},
             "required": ["name", "age"], "additionalProperties": False},
    "nested": {"type": "object", "properties": {"user": {"type": "object", "properties": {
        "name": NAME, "address": {"type": "object", "properties": {"city": NAME, "zip": {"type": "string",
                                                                                           "pattern": "^[0-9]{5}$"}},
                                  "required": ["city", "zip"], "additionalProperties": False}},
        "required": ["name", "address"], "additionalProperties": False}}, "required": ["user"],
        "additionalProperties": False},
    "bounded_array": {"type": "object", "properties": {"tags": {"type": "array", "items": NAME, "minItems": 1,
                                                                "maxItems": 3}},
                      "required": ["tags"], "additionalProperties": False},
    "enum": {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                              "size": {"type": "string", "enum": ["S", "M", "L"]}},
             "required": ["color", "size"], "additionalProperties": False},
    "any_of": {"type": "object", "properties": {"value": {"anyOf": [{"type": "integer"}, NAME, {"type": "boolean"}]}},
               "required": ["value"], "additionalProperties": False},
    "bounded_numbers": {"type": "object", "properties": {
        "temperature": {"type": "number", "minimum": -50, "maximum": 50},
        "count": {"type": "integer", "minimum": 1, "maximum": 9}}, "required": ["temperature", "count"],
        "additionalProperties": False},
    "pattern": {"type": "object", "properties": {"date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
                                                 "code": {"type": "string", "pattern": "^[A-Z]{3}[0-9]{2}$"}},
                "required": ["date", "code"], "additionalProperties": False},
    "array_of_objects": {"type": "array", "items": {"type": "object", "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 999}, "ok": {"type": "boolean"}},
        "required": ["id", "ok"], "additionalProperties": False}, "minItems": 1, "maxItems": 3},
    "optional_and_null": {"type": "object", "properties": {"title": NAME, "note": {"type": ["string", "null"],
                                                                                   "maxLength": 16}},
                          "required": ["title", "note"], "additionalProperties": False},
    "const_and_bool": {"type": "object", "properties": {"kind": {"const": "event"}, "public": {"type": "boolean"},
                                                        "rank": {"type": "integer", "exclusiveMinimum": 0,
                                                                 "exclusiveMaximum": 4}},
                       "required": ["kind", "public", "rank"], "additionalProperties": False},
}
