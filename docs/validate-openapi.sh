#!/usr/bin/env bash
# Validates docs/openapi.yaml with openapi-spec-validator (PyPI), then checks
# every example in the spec against the schema it illustrates.
#
#   docs/validate-openapi.sh [path/to/openapi.yaml]
set -euo pipefail

spec=${1:-"$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/openapi.yaml"}
requirement='openapi-spec-validator>=0.7,<1'

if ! python3 -c 'import openapi_spec_validator' 2>/dev/null; then
  # PEP 668 system Pythons refuse a plain install; this is a throwaway CI/dev machine.
  python3 -m pip install --quiet "$requirement" 2>/dev/null ||
    python3 -m pip install --quiet --break-system-packages "$requirement"
fi

python3 -m openapi_spec_validator "$spec"

python3 - "$spec" <<'PY'
"""Every `example`/`examples` value must match its schema (the spec validator
does not look at examples)."""
import sys

import yaml
from openapi_schema_validator import OAS31Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

path = sys.argv[1]
with open(path, encoding="utf-8") as f:
    spec = yaml.safe_load(f)
base = "urn:kvmfork-openapi"
registry = Registry().with_resource(base, Resource(contents=spec, specification=DRAFT202012))


def esc(part):
    return str(part).replace("~", "~0").replace("/", "~1")


def resolve(node, pointer):
    """Follows local $refs (responses are shared that way); returns the node and its JSON pointer."""
    while isinstance(node, dict) and "$ref" in node:
        pointer = node["$ref"].lstrip("#")
        node = spec
        for part in pointer.lstrip("/").split("/"):
            node = node[part.replace("~1", "/").replace("~0", "~")]
    return node, pointer


checked, failures = 0, []
for route, item in spec["paths"].items():
    for method, op in item.items():
        op_pointer = f"/paths/{esc(route)}/{method}"
        bodies = [("request", op.get("requestBody", {}), f"{op_pointer}/requestBody")]
        bodies += [(f"response {status}", resp, f"{op_pointer}/responses/{status}")
                   for status, resp in op.get("responses", {}).items()]
        for label, body, pointer in bodies:
            body, pointer = resolve(body, pointer)
            for media, content in body.get("content", {}).items():
                if "schema" not in content:
                    continue
                # Validate through a $ref into the document so the schema's own
                # local $refs resolve against the spec.
                schema_ref = {"$ref": f"{base}#{pointer}/content/{esc(media)}/schema"}
                validator = OAS31Validator(schema_ref, registry=registry)
                examples = [("example", content["example"])] if "example" in content else []
                examples += [(name, resolve(ex, "")[0]["value"])
                             for name, ex in content.get("examples", {}).items()]
                for name, value in examples:
                    checked += 1
                    for error in validator.iter_errors(value):
                        failures.append(f"{method.upper()} {route} {label} {media} {name}: {error.message}")
if failures:
    print("\n".join(failures), file=sys.stderr)
    sys.exit(f"{len(failures)} example(s) do not match their schema")
if checked == 0:
    sys.exit("no examples found: the example check would prove nothing")
print(f"{path}: {checked} examples match their schemas")
PY
