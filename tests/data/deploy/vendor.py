"""How the schemas here were made (kept for provenance; CI never runs it, the tests read the JSON).

    python tests/data/deploy/vendor.py RAYSERVICE_CRD.yaml PROD_STACK_SCHEMA.json LLMD_SCHEMA.json

Sources (see README.md for the commits): KubeRay's RayService CRD (the served storage version
v1's openAPIV3Schema), and the values.schema.json of the production-stack and
llm-d-modelservice charts. Only annotation keywords (description, title, examples, $comment)
are dropped: no validation result changes.
"""

import json
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).parent
ANNOTATIONS = {"description", "title", "examples", "$comment"}
NAME_MAPS = {"properties", "patternProperties", "definitions", "$defs"}  # keys are names, not keywords


def strip(node, names=False):
    if isinstance(node, list):
        return [strip(x) for x in node]
    if not isinstance(node, dict):
        return node
    if names:
        return {k: strip(v) for k, v in node.items()}
    return {k: strip(v, k in NAME_MAPS) for k, v in node.items() if k not in ANNOTATIONS}


def dump(schema, name):
    (HERE / name).write_text(json.dumps(strip(schema), sort_keys=True, separators=(",", ":")) + "\n")


if __name__ == "__main__":
    crd, stack, llmd = sys.argv[1:4]
    v1 = next(v for v in yaml.safe_load(open(crd))["spec"]["versions"] if v["name"] == "v1")
    dump(v1["schema"]["openAPIV3Schema"], "kuberay-rayservice-v1.schema.json")
    dump(json.load(open(stack)), "production-stack-values.schema.json")
    dump(json.load(open(llmd)), "llm-d-modelservice-values.schema.json")
