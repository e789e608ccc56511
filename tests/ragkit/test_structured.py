"""Schema-constrained JSON on the embedded SmolLM2: every schema shape yields a valid object, and failures are clear."""

from __future__ import annotations

import json
from enum import Enum
from typing import Literal, Optional

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from pydantic import BaseModel, ConfigDict, Field

from ragkit import structured
from ragkit.structured import StructuredOutputError


class Flat(BaseModel):
    city: str = Field(max_length=20)
    population: int
    capital: bool


class Address(BaseModel):
    street: str = Field(max_length=20)
    number: int


class Nested(BaseModel):
    name: str = Field(max_length=20)
    address: Address


class Item(BaseModel):
    name: str = Field(max_length=12)
    price: float


class ListOfObjects(BaseModel):
    items: list[Item] = Field(min_length=2, max_length=3)


class Color(str, Enum):
    red = "red"
    green = "green"
    blue = "blue"


class Enumerated(BaseModel):
    color: Color
    size: Literal["S", "M", "L"]


class Ranges(BaseModel):
    age: int = Field(ge=18, le=65)
    score: float = Field(ge=0.0, le=1.0)


class Optional_(BaseModel):
    title: str = Field(max_length=20)
    subtitle: Optional[str] = Field(default=None, max_length=20)
    year: Optional[int] = None


class Closed(BaseModel):
    model_config = ConfigDict(extra="forbid")
    key: str = Field(max_length=10)
    value: int


SCHEMAS = {
    "flat": (Flat, "Describe Paris."),
    "nested": (Nested, "Describe a person and their home address."),
    "list of objects": (ListOfObjects, "List a few fruits and their prices."),
    "enum": (Enumerated, "Pick a shirt."),
    "integer and number ranges": (Ranges, "Describe a student: age and test score."),
    "optional fields": (Optional_, "Name a book."),
    "additionalProperties false": (Closed, "Give one setting and its value."),
}


def ask(llm, question: str, schema, **gen):
    return llm.complete(f"{question} {structured.instruction(schema)}", json_schema=schema, **gen)


@pytest.mark.parametrize("kind", SCHEMAS)
def test_smollm2_under_constraint_yields_a_valid_object(smollm2, kind):
    model, question = SCHEMAS[kind]
    response = ask(smollm2, question, model, max_new_tokens=96)
    obj = structured.parse(response.text, model)  # raises unless it is exactly one valid object
    assert isinstance(obj, model)
    assert response.additional_kwargs["finish_reason"] == "stop"
    if kind == "additionalProperties false":
        assert set(json.loads(response.text)) <= {"key", "value"}


def test_additional_properties_false_is_in_the_grammar_not_only_in_the_check(smollm2):
    schema = Closed.model_json_schema()
    assert schema["additionalProperties"] is False
    text = ask(smollm2, "Give one setting, its value, and also a comment field.", schema, max_new_tokens=64).text
    assert set(json.loads(text)) == {"key", "value"}


_leaf = st.one_of(
    st.builds(lambda n: {"type": "string", "maxLength": n}, st.integers(1, 12)),
    st.builds(lambda lo, span: {"type": "integer", "minimum": lo, "maximum": lo + span},
              st.integers(-50, 50), st.integers(0, 100)),
    st.builds(lambda lo: {"type": "number", "minimum": lo, "maximum": lo + 10}, st.integers(-5, 5)),
    st.just({"type": "boolean"}),
    st.builds(lambda vs: {"enum": vs}, st.lists(st.sampled_from(["a", "bb", "on", "off", "x1"]), min_size=1,
                                                  max_size=3, unique=True)),
)


def _obj(children):
    names = st.lists(st.sampled_from(["id", "name", "size", "kind", "tag", "level"]), min_size=1, max_size=3,
                     unique=True)
    return names.flatmap(lambda keys: st.tuples(st.lists(children, min_size=len(keys), max_size=len(keys)),
                                                st.integers(0, len(keys))).map(
        lambda t: {"type": "object", "properties": dict(zip(keys, t[0])), "required": keys[: t[1]],
                   "additionalProperties": False}))


_schemas = _obj(st.recursive(_leaf, lambda inner: st.one_of(
    _obj(inner), st.builds(lambda item, n: {"type": "array", "items": item, "maxItems": n}, inner, st.integers(1, 2))),
    max_leaves=4))


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schema=_schemas)
def test_generated_schemas_yield_valid_objects(smollm2, schema):
    response = ask(smollm2, "Fill in an example.", schema, max_new_tokens=160)
    value = structured.parse(response.text, schema)
    assert Draft202012Validator(schema).is_valid(value)


def test_budget_running_out_mid_object_is_a_clear_error_with_the_raw_text(smollm2):
    response = ask(smollm2, "Describe a person and their home address.", Nested, max_new_tokens=4)
    assert response.additional_kwargs["finish_reason"] == "length"
    with pytest.raises(StructuredOutputError, match="budget of 4 tokens ran out.*max_new_tokens") as err:
        structured.parse(response.text, Nested, finish_reason="length", budget=4)
    assert err.value.raw == response.text and response.text.startswith("{")


def test_text_outside_the_object_is_refused():
    with pytest.raises(StructuredOutputError, match="not one JSON object.*Raw text: 'Sure! "):
        structured.parse('Sure! {"key": "a", "value": 1}', Closed)


def test_an_object_of_the_wrong_shape_names_the_field():
    with pytest.raises(StructuredOutputError, match="value"):
        structured.parse('{"key": "a", "value": "one"}', Closed)
    with pytest.raises(StructuredOutputError, match="at value: 'one' is not of type 'integer'"):
        structured.parse('{"key": "a", "value": "one"}', Closed.model_json_schema())


def test_an_invalid_schema_dict_is_refused_before_generation(smollm2):
    with pytest.raises(StructuredOutputError, match="JSON schema is invalid"):
        smollm2.complete("hi", json_schema={"type": "objekt"})
