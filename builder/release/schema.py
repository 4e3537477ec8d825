"""Write schemas/release.schema.json from the typed models (builder/release/models.py), deterministically.

    python -m builder.release.schema            # after editing the models: rewrite the schema
    python -m builder.release.schema --check    # exit 1 when the committed schema is not what they generate
"""

import json
import sys
from functools import cache

from builder.canonical import pretty_json
from builder.paths import SCHEMAS_DIR
from builder.release.models import Spec

FILE = "release.schema.json"
HEADER = {"$schema": "https://json-schema.org/draft/2020-12/schema",
          "$id": "https://quant-release.dev/schemas/release.schema.json"}
# Keys pydantic writes that say nothing to a validator or a reader: generated titles ("Num Bits"), and
# the OpenAPI discriminator (its mapping points into $defs, which are inlined).
DROPPED = ("title", "discriminator")


@cache
def generate() -> dict:
    """The resolved spec's JSON Schema (draft 2020-12), every reference inlined so each group stands
    alone (builder/source/importer.py validates a model file against properties.model)."""
    document = Spec.model_json_schema(by_alias=True, mode="validation")
    definitions = document.pop("$defs", {})
    return {**HEADER, **inline(document, definitions), "title": "Resolved release spec"}


def inline(node, definitions: dict):
    """node with every {"$ref": "#/$defs/X"} replaced by X (its own siblings kept) and DROPPED removed."""
    if isinstance(node, list):
        return [inline(item, definitions) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = definitions[node["$ref"].removeprefix("#/$defs/")]
        return inline({**target, **{k: v for k, v in node.items() if k != "$ref"}}, definitions)
    found = {}
    for key, value in node.items():
        if key == "properties":  # names of keys, not schema keywords: keep every one
            found[key] = {name: inline(sub, definitions) for name, sub in value.items()}
        elif key not in DROPPED:
            found[key] = inline(value, definitions)
    return found


def text() -> str:
    """The schema file's bytes, as text."""
    return pretty_json(generate())


@cache
def validator(name: str = FILE):
    """A jsonschema validator of a committed schema file (for readers of the files, not of specs)."""
    from jsonschema import Draft202012Validator

    document = json.loads((SCHEMAS_DIR / name).read_text(encoding="utf-8"))
    Draft202012Validator.check_schema(document)
    return Draft202012Validator(document)


def main(argv: list) -> int:
    path = SCHEMAS_DIR / FILE
    current = path.read_text(encoding="utf-8") if path.is_file() else None
    if "--check" in argv:
        if current != text():
            print(f"schemas/{FILE} is not what builder/release/models.py generates; run "
                  "python -m builder.release.schema", file=sys.stderr)
            return 1
        print(f"schemas/{FILE} is up to date")
        return 0
    if current != text():
        path.write_text(text(), encoding="utf-8")
        print(f"wrote schemas/{FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
