"""Structured output through the official `openai` and `ollama` packages: 50 generated JSON
schemas (nested objects, bounded arrays, enums, integer and number ranges, optional fields, `$ref`,
`anyOf`) at several temperatures and seeds all produce output that validates (`jsonschema`),
and the SDK's `chat.completions.parse` with a Pydantic model returns a parsed object.

The first 50 schemas bound every value (string lengths, item counts, integer ranges); 25 more
bound no value (free strings, open arrays, integers without a maximum; objects closed to extra
keys, as OpenAI's strict schemas are) and get small token budgets: the server closes the output
as the budget runs low, so those validate too."""

import json
import random
from typing import Literal

import jsonschema
import ollama
import openai
import pytest
from pydantic import BaseModel, Field


@pytest.fixture(scope="module")
def client(server_url):
    return openai.OpenAI(base_url=server_url + "/v1", api_key="unused")


def leaf(rng, bounded=True):
    kind = rng.choice(["enum", "string", "integer", "number", "boolean", "const"])
    if kind == "enum":
        return {"enum": rng.sample(["red", "green", "blue", "cat", "dog", "x", "yes", "no"], rng.randint(1, 4))}
    if kind == "string":
        return {"type": "string", "maxLength": rng.randint(0, 8)} if bounded else {"type": "string"}
    if kind == "integer":
        lo = rng.randint(-50, 50)
        if not bounded:
            return {"type": "integer", "minimum": lo}
        return {"type": "integer", "minimum": lo, "maximum": lo + rng.randint(0, 500)}
    if kind == "number":
        lo = round(rng.uniform(-10, 10), 2)
        if not bounded:
            return {"type": "number", "exclusiveMinimum": lo}
        return {"type": "number", "minimum": lo, "maximum": round(lo + rng.uniform(0.01, 100), 2)}
    if kind == "const":
        return {"const": rng.choice(["fixed", 7, True])}
    return {"type": "boolean"}


def value(rng, depth, defs, bounded):
    kind = rng.random()
    if depth < 2 and kind < 0.25:
        return obj(rng, depth + 1, defs, bounded)
    if kind < 0.4:
        array = {"type": "array", "items": value(rng, depth + 1, defs, bounded)}
        if bounded:
            array["maxItems"] = rng.randint(0, 3)
        return array
    if kind < 0.5:
        name = f"d{len(defs)}"
        defs[name] = leaf(rng, bounded)
        return {"$ref": f"#/$defs/{name}"}
    if kind < 0.6:
        return {"anyOf": [leaf(rng, bounded), leaf(rng, bounded)]}
    return leaf(rng, bounded)


def obj(rng, depth, defs, bounded=True):
    keys = rng.sample(["id", "name", "kind", "tags", "size", "ok", "meta", "items", "owner", "score"], rng.randint(1, 4))
    props = {k: value(rng, depth, defs, bounded) for k in keys}
    required = [k for k in keys if rng.random() < 0.7]
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


def schemas(n=50, bounded=True, seed=1234):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        defs = {}
        schema = obj(rng, 0, defs, bounded)
        if defs:
            schema["$defs"] = defs
        out.append(schema)
    return out


@pytest.mark.parametrize("index,schema", list(enumerate(schemas())))
def test_generated_schema_output_validates(client, index, schema):
    temperature = [0.0, 0.7, 1.0, 1.3][index % 4]
    r = client.chat.completions.create(
        model="stories260k",
        messages=[{"role": "user", "content": "Describe something as JSON."}],
        max_tokens=400,
        temperature=temperature,
        seed=index,
        response_format={"type": "json_schema", "json_schema": {"name": f"s{index}", "schema": schema}},
    )
    choice = r.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    jsonschema.validate(json.loads(choice.message.content), schema)


@pytest.mark.parametrize("index,schema", list(enumerate(schemas(25, bounded=False, seed=99))))
def test_unbounded_schema_output_closes_within_its_budget(client, index, schema):
    # Room for each schema's shortest completion (stories260k spells keys a character a token),
    # far less than an unconstrained story model would write inside its free strings.
    max_tokens = [240, 280, 320, 400][index % 4]
    r = client.chat.completions.create(
        model="stories260k",
        messages=[{"role": "user", "content": "Describe something as JSON."}],
        max_tokens=max_tokens,
        temperature=[0.7, 1.0, 1.3][index % 3],
        seed=index,
        response_format={"type": "json_schema", "json_schema": {"name": f"u{index}", "schema": schema}},
    )
    choice = r.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    assert r.usage.completion_tokens <= max_tokens
    jsonschema.validate(json.loads(choice.message.content), schema)


class Pet(BaseModel):
    name: str = Field(max_length=10)
    kind: Literal["cat", "dog", "bird"]
    age: int = Field(ge=0, le=30)
    friendly: bool


def test_sdk_parse_returns_the_pydantic_object(client):
    for seed in range(3):
        r = client.chat.completions.parse(
            model="stories260k",
            messages=[{"role": "user", "content": "Describe a pet."}],
            response_format=Pet,
            max_tokens=200,
            temperature=1.0,
            seed=seed,
        )
        pet = r.choices[0].message.parsed
        assert isinstance(pet, Pet)
        assert len(pet.name) <= 10 and 0 <= pet.age <= 30


def test_ollama_format_schema_validates(server_url):
    # Pydantic's schema allows extra keys; closing the object keeps a story model from adding
    # them until the budget runs out.
    schema = dict(Pet.model_json_schema(), additionalProperties=False)
    c = ollama.Client(host=server_url)
    r = c.chat(model="stories260k", messages=[{"role": "user", "content": "A pet?"}], format=schema,
               options={"temperature": 0.8, "seed": 3, "num_predict": 200})
    Pet.model_validate_json(r.message.content)
