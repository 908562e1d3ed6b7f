"""Make `kuberay-v1.7.0-rayjob-v1-schema.json` from KubeRay's RayJob CRD (not run by the tests).

    git show v1.7.0:ray-operator/config/crd/bases/ray.io_rayjobs.yaml > ray.io_rayjobs.yaml   # ray-project/kuberay
    python tests/data/trim_rayjob_crd.py ray.io_rayjobs.yaml tests/data/kuberay-v1.7.0-rayjob-v1-schema.json

The CRD is 1.4 MB, mostly the same Kubernetes PodTemplateSpec schema three times (head, workers,
submitter) in two versions. This keeps `spec.versions[name=v1].schema.openAPIV3Schema` only, drops the
`description`s, and moves every repeated subschema to `$defs` (replaced by a `$ref`): the same constraints,
a fraction of the size.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

MIN_SHARED_CHARS = 400


def _strip(node: Any) -> Any:
    if isinstance(node, dict):
        return {key: _strip(value) for key, value in node.items() if key != "description"}
    if isinstance(node, list):
        return [_strip(value) for value in node]
    return node


def _key(node: Any) -> str:
    return json.dumps(node, sort_keys=True, separators=(",", ":"))


def _subtrees(node: Any, counter: Counter[str]) -> None:
    if isinstance(node, dict):
        counter[_key(node)] += 1
        for value in node.values():
            _subtrees(value, counter)
    elif isinstance(node, list):
        for value in node:
            _subtrees(value, counter)


def _replace(node: Any, target: str, ref: dict[str, str]) -> Any:
    if isinstance(node, dict):
        if _key(node) == target:
            return dict(ref)
        return {key: _replace(value, target, ref) for key, value in node.items()}
    if isinstance(node, list):
        return [_replace(value, target, ref) for value in node]
    return node


def trim(crd: dict[str, Any]) -> dict[str, Any]:
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = _strip(version["schema"]["openAPIV3Schema"])
    defs: dict[str, Any] = {}
    while True:
        counter: Counter[str] = Counter()
        _subtrees(schema, counter)
        for value in defs.values():
            _subtrees(value, counter)
        shared = [key for key, count in counter.items() if count > 1 and len(key) >= MIN_SHARED_CHARS]
        if not shared:
            break
        target = max(shared, key=len)
        name = "s" + hashlib.sha256(target.encode()).hexdigest()[:12]
        ref = {"$ref": f"#/$defs/{name}"}
        schema = _replace(schema, target, ref)
        defs = {key: _replace(value, target, ref) for key, value in defs.items()}
        defs[name] = json.loads(target)
    return {**schema, "$defs": defs}


def main(source: str, destination: str) -> None:
    raw = Path(source).read_bytes()
    crd = yaml.safe_load(raw)
    trimmed = trim(crd)
    trimmed["$comment"] = (
        "KubeRay v1.7.0 ray-operator/config/crd/bases/ray.io_rayjobs.yaml (sha256 "
        f"{hashlib.sha256(raw).hexdigest()}), spec.versions[v1].schema.openAPIV3Schema without descriptions, "
        "repeated subschemas moved to $defs; made by tests/data/trim_rayjob_crd.py"
    )
    with open(destination, "w") as handle:
        json.dump(trimmed, handle, sort_keys=True, separators=(",", ":"))
        handle.write("\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
