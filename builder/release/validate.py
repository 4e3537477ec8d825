"""Validate a composed spec against the typed models; every error as (key path, message) naming what is
allowed (builder/release/resolve.py names the file that set the key). Pure.

    typed(spec) -> (Spec, [])  or  (None, [(("quant", "weights", "type"), '"posit" is not allowed; ...'), ...])
"""

import json

from pydantic import ValidationError

from builder.release.models import Spec
from builder.release.schema import generate

BOUNDS = {"greater_than_equal": ("ge", "is less than the minimum of"),
          "greater_than": ("gt", "is less than or equal to the minimum of"),
          "less_than_equal": ("le", "is greater than the maximum of"),
          "less_than": ("lt", "is greater than or equal to the maximum of")}


def typed(document: dict) -> tuple:
    """(the typed Spec, []) when the document is valid, else (None, every problem in key order)."""
    try:
        return Spec.of(document), []
    except ValidationError as error:
        found = set()
        for item in error.errors():
            found.update(explain(item, document))
        return None, sorted(found)


def explain(error: dict, document: dict) -> list:
    """One readable (path, message) per pydantic error, its path the document's own keys."""
    path, value = keys(error["loc"], document)
    kind, context = error["type"], error.get("ctx") or {}
    node = schema_at(path, document)
    shown = json.dumps(value) if is_scalar(value) else "value"
    if kind == "extra_forbidden":
        allowed = sorted(schema_at(path[:-1], document).get("properties", {}))
        return [(path, f"unknown key; allowed keys: {', '.join(allowed)}")]
    if kind == "missing":
        return [(path, "missing required key")]
    if kind == "required_with":
        return [((*path, key), f"missing required key ({context['why']})") for key in context["keys"]]
    if kind in ("literal_error", "enum", "union_tag_invalid"):
        choices = node.get("enum") or [branch["properties"]["kind"]["const"] for branch in node.get("oneOf", [])]
        if kind == "union_tag_invalid":
            path, shown = (*path, "kind"), json.dumps(context.get("tag"))
        return [(path, f"{shown} is not allowed; allowed: {', '.join(json.dumps(v) for v in choices)}")]
    if kind in BOUNDS:
        bound, words = BOUNDS[kind]
        return [(path, f"{shown}: {shown} {words} {context[bound]}")]
    if kind == "string_pattern_mismatch":
        return [(path, f"{shown}: {node.get('description') or 'must match ' + context['pattern']}")]
    if kind.endswith("_type") or kind.endswith("_parsing") or kind == "int_from_float":
        return [(path, f"{shown}: expected {' or '.join(types(node)) or kind.split('_')[0]}")]
    if kind in ("too_long", "too_short"):
        limit = f"at most {context['max_length']}" if kind == "too_long" else f"at least {context['min_length']}"
        return [(path, f"{shown}: {context['actual_length']} items; {limit} allowed")]
    if kind == "value_error":
        return [(path, f"{shown}: {context['error']}")]
    return [(path, f"{shown}: {error['msg'][0].lower()}{error['msg'][1:]}")]


def keys(loc: tuple, document) -> tuple:
    """(the key path of loc within document, the value there): pydantic's union branch names dropped."""
    path, node = [], document
    for part in loc:
        if isinstance(node, dict) and isinstance(part, str) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        elif isinstance(node, dict) and isinstance(part, str) and part == loc[-1]:
            node = None  # a missing or unknown key: the last part names it
        else:
            continue  # a union branch (int, float, hf, ...): not a key of the document
        path.append(str(part))
    return tuple(path), node


def schema_at(path: tuple, document) -> dict:
    """The generated schema's node for a key path (nullable and tagged unions resolved by the data)."""
    node, value = generate(), document
    for part in path:
        node = branch(node, value)
        if "properties" in node:
            node = node["properties"].get(part, {})
        elif "prefixItems" in node and part.isdigit() and int(part) < len(node["prefixItems"]):
            node = node["prefixItems"][int(part)]
        else:
            node = node.get("items", {})
        value = value.get(part) if isinstance(value, dict) else \
            value[int(part)] if isinstance(value, list) and part.isdigit() and int(part) < len(value) else None
    return branch(node, value)


def branch(node: dict, value) -> dict:
    """The alternative of anyOf / oneOf that describes value: not null, the one of its kind."""
    options = [o for o in node.get("anyOf", []) if o.get("type") != "null"]
    if len(options) == 1:
        node = options[0]
    kind = value.get("kind") if isinstance(value, dict) else None
    tagged = [o for o in node.get("oneOf", []) if o.get("properties", {}).get("kind", {}).get("const") == kind]
    return tagged[0] if tagged else node


def types(node: dict) -> list:
    """The JSON types a schema node allows, in words (integer, number, string, ...), null aside."""
    found = [node["type"]] if "type" in node else []
    found += [t for o in node.get("anyOf", []) for t in types(o) if t != "null"]
    return [t for i, t in enumerate(found) if t not in found[:i] and t != "null"]


def is_scalar(value) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))
