"""The API contract users were given (`shared/openapi.yaml`, beside the repository) as a test helper.

`check_response(method, path_template, response)` asserts that a response is one the spec declares for that
operation: a declared status code, a declared media type, a JSON body valid against the declared schema (OpenAPI
3.0 semantics, `$ref`s resolved against the whole spec) and the declared headers. `COMFY_ENDPOINT_OPENAPI`
overrides where the spec is read from.

The spec has defects that no real ComfyUI (nor this service, DESIGN.md §4) can satisfy. `_patch` fixes them in the
loaded copy, each one asserted present first so that a corrected spec makes the patch fail loudly, never pass
silently:
 1. `QueueTuple` puts `minItems/maxItems: 4` inside `items` and makes each item `oneOf [number, Prompt, ExtraData]`:
    the prompt_id string matches none and an object matches both Prompt and ExtraData, so no queue tuple validates.
    Patched to what it describes: exactly 4 items, each a number, string or object (tests check each item).
 2. `POST /prompt` declares `text/plain` bodies; ComfyUI (and DESIGN §4) answer JSON `{prompt_id, number,
    node_errors}` (200) and `{error, node_errors}` (400). Patched to those JSON shapes.
 3. The `POST /api/v1/prompts` 200 example says `uris`, its schema `urls`: the schema wins; the example is renamed.
 4. `/object_info` declares each class as an array of Node; ComfyUI answers one Node object per class. Patched.
 5. `Node.input.required`: `minItems 1/maxItems 2` sit inside `items`, so they bind each element: a combo list with
    0 or 3+ choices fails (LoadImage with an empty input/ folder offers `[]`); and the options object types
    `default` as a string, which INT/FLOAT/BOOLEAN defaults are not. Patched: the bounds bind the `[type, options]`
    array; `default` may be any type.
 6. `PromptNode.inputs` has no boolean (BOOLEAN widgets send true/false), and its link bounds sit inside `items`
    too. Patched: booleans allowed; a link is an array of exactly 2 (node id, output index).
 7. `Workflow` (inside ExtraData.extra_pnginfo): `widgets_values` only strings (the front end saves numbers and
    booleans), `size` only an object (the front end saves `[w, h]`), `flags` values only objects (`collapsed` is a
    boolean), node input `link` / output `links` not nullable (unconnected slots are null), link bounds inside
    `items`. Patched to those shapes.
 8. DESIGN §4 adds `Accept: image/png` to `POST /api/v1/prompts` (the PNG itself, same headers): declared as an
    additional 200 media type.
Not patched because responses alone are checked here: the `POST /queue` and `/history` request schemas type
`delete` items as integers, but ComfyUI deletes by prompt_id (a uuid string); `POST /api/v1/prompts` names its
multipart type `multipart/formdata` (sic).
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import yaml
from openapi_schema_validator import OAS30Validator
from referencing import Registry, Resource

URI = "urn:comfy-endpoint:openapi"
DEFAULT_PATH = Path(__file__).resolve().parents[2] / "shared" / "openapi.yaml"
ANY: dict[str, Any] = {}
LINK = {"type": "array", "minItems": 2, "maxItems": 2, "items": {"oneOf": [{"type": "string"}, {"type": "integer"}]}}


def spec_path() -> Path:
    return Path(os.environ.get("COMFY_ENDPOINT_OPENAPI") or DEFAULT_PATH)


def _absolute_refs(node: Any) -> Any:
    """`#/...` refs rewritten to the spec's registry URI, so a schema fragment validates on its own."""
    if isinstance(node, dict):
        return {k: (URI + v if k == "$ref" and v.startswith("#") else _absolute_refs(v)) for k, v in node.items()}
    return [_absolute_refs(v) for v in node] if isinstance(node, list) else node


def _patch(spec: dict[str, Any]) -> None:
    """The numbered defects of the module docstring, each asserted present before it is patched."""
    schemas, paths = spec["components"]["schemas"], spec["paths"]
    assert "oneOf" in schemas["QueueTuple"]["items"], "defect 1 fixed upstream?"  # 1
    schemas["QueueTuple"].update(minItems=4, maxItems=4, items={"anyOf": [{"type": t} for t in
                                                                          ("number", "string", "object")]})
    post_prompt = paths["/prompt"]["post"]["responses"]  # 2
    assert list(post_prompt["200"]["content"]) == ["text/plain"], "defect 2 fixed upstream?"
    error = {"type": "object", "required": ["type", "message"], "properties": {"type": {"type": "string"},
                                                                            "message": {"type": "string"}}}
    for status, fields in (("200", {"prompt_id": {"type": "string"}, "number": {"type": "number"}}),
                           ("400", {"error": error})):
        fields = {**fields, "node_errors": {"type": "object"}}
        post_prompt[status]["content"] = {"application/json": {"schema": {
            "type": "object", "required": list(fields), "properties": fields}}}
    ok = paths["/api/v1/prompts"]["post"]["responses"]["200"]  # 3 and 8
    json_body = ok["content"]["application/json"]["schema"]
    assert "urls" in json_body["properties"] and "uris" in json_body["example"], "defect 3 fixed upstream?"
    json_body["example"] = {"urls": json_body["example"].pop("uris")}
    ok["content"]["image/png"] = {"schema": {"type": "string", "format": "binary"}}
    info = paths["/object_info"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]  # 4
    assert info["additionalProperties"]["type"] == "array", "defect 4 fixed upstream?"
    info["additionalProperties"] = {"$ref": "#/components/schemas/Node"}
    per_input = schemas["Node"]["properties"]["input"]["properties"]["required"]["additionalProperties"]  # 5
    assert "maxItems" in per_input["items"], "defect 5 fixed upstream?"
    options = per_input["items"].pop("oneOf")
    options[2]["properties"]["default"] = ANY
    per_input.update(minItems=per_input["items"].pop("minItems"), maxItems=per_input["items"].pop("maxItems"),
                     items={"oneOf": options})
    inputs = schemas["PromptNode"]["properties"]["inputs"]  # 6
    assert {"type": "boolean"} not in inputs["additionalProperties"]["oneOf"], "defect 6 fixed upstream?"
    inputs["additionalProperties"] = {"oneOf": [{"type": "number"}, {"type": "string"}, {"type": "boolean"}, LINK]}
    workflow = schemas["Workflow"]["properties"]  # 7
    node = workflow["nodes"]["items"]["properties"]
    assert node["widgets_values"]["items"] == {"type": "string"}, "defect 7 fixed upstream?"
    node["widgets_values"]["items"] = ANY
    node["size"] = {"anyOf": [node["size"], {"type": "array", "items": {"type": "number"}}]}
    node["flags"]["additionalProperties"] = ANY
    node["inputs"]["items"]["properties"]["link"]["nullable"] = True
    node["outputs"]["items"]["properties"]["links"]["nullable"] = True
    workflow["links"]["items"] = {"type": "array", "minItems": 6, "maxItems": 6,
                                  "items": {"oneOf": [{"type": "integer"}, {"type": "string"}]}}


@functools.cache
def spec() -> dict[str, Any]:
    """The spec as loaded (response codes as strings), patched, with absolute `$ref`s."""
    loaded = yaml.safe_load(spec_path().read_text(encoding="utf-8"))
    for operations in loaded["paths"].values():
        for operation in operations.values():
            operation["responses"] = {str(code): value for code, value in operation["responses"].items()}
    _patch(loaded)
    return _absolute_refs(loaded)


@functools.cache
def _registry() -> Registry:
    return Registry().with_resource(URI, Resource.opaque(spec()))


def operations() -> set[tuple[str, str]]:
    """Every (METHOD, path template) in the spec."""
    return {(method.upper(), path) for path, ops in spec()["paths"].items() for method in ops}


def operation(method: str, path_template: str) -> dict[str, Any]:
    ops = spec()["paths"].get(path_template, {})
    assert method.lower() in ops, f"the spec has no operation {method.upper()} {path_template}"
    return ops[method.lower()]


def validate(instance: Any, schema: dict[str, Any]) -> None:
    """Raise `jsonschema.ValidationError` unless `instance` is valid (OpenAPI 3.0) against a schema of the spec."""
    OAS30Validator(_absolute_refs(schema), registry=_registry()).validate(instance)


def component(name: str) -> dict[str, Any]:
    """A `#/components/schemas/...` schema, for `validate`."""
    return {"$ref": f"{URI}#/components/schemas/{name}"}


def check_response(method: str, path_template: str, response: Any) -> Any:
    """Assert `response` is one the spec declares for the operation; return it."""
    responses = operation(method, path_template)["responses"]
    status = str(response.status_code)
    where = f"{method.upper()} {path_template} -> {status}"
    assert status in responses, f"{where}: not declared (declared: {sorted(responses)}); body: {response.text[:300]}"
    declared = responses[status]
    missing = [name for name in declared.get("headers", {}) if name not in response.headers]
    assert not missing, f"{where}: declared headers missing: {missing}"
    content = declared.get("content")
    if content:
        media = response.headers.get("content-type", "").split(";")[0].strip().lower()
        assert media in content, f"{where}: media type {media!r} not declared (declared: {sorted(content)})"
        schema = content[media].get("schema")
        if schema is not None and (media == "application/json" or media.endswith("+json")):
            validate(response.json(), schema)
    return response
