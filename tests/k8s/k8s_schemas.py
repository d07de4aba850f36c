"""Schema checks of rendered manifests: KubeRay objects against their CRD, the rest against Kubernetes'.

A CRD's openAPIV3Schema is OpenAPI, not plain JSON Schema. The differences handled here:
- an object schema with `properties` and no `additionalProperties` is closed: the API server would prune
  (silently drop) an unknown field, so a typo would vanish; here it is an error instead;
- `x-kubernetes-int-or-string` without an `anyOf` becomes integer-or-string; `nullable` admits null;
- `x-kubernetes-list-type: map` (items unique by `x-kubernetes-list-map-keys`) and `set` (unique items)
  are checked, as the API server does;
- `format: int32 / int64` are range-checked;
- `x-kubernetes-validations` holds CEL rules, which are not evaluated: every rule that an instance
  reaches is recorded in `CrdCheck.cel_rules` so that a test can require there be none (or look at them).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import yaml

INT_RANGES = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}
# The KubeRay kinds and their CRD files; every other kind is checked with kubernetes-validate.
CRD_FILES = {"RayJob": "ray.io_rayjobs.yaml", "RayCluster": "ray.io_rayclusters.yaml"}


@dataclass
class CrdCheck:
    """Errors (one line each) and the CEL rules the instance reached, as (JSON path, rule) pairs."""

    errors: list[str] = field(default_factory=list)
    cel_rules: list[tuple[str, str]] = field(default_factory=list)


def _close(node: Any) -> Any:
    """Rewrite a CRD schema node (recursively) into the JSON Schema described in the module docstring."""
    if isinstance(node, list):
        return [_close(item) for item in node]
    if not isinstance(node, dict):
        return node
    # enum, default and required hold data, and properties maps names to schemas: none is a schema itself.
    out = {
        key: (value if key in ("enum", "default", "required", "properties") else _close(value))
        for key, value in node.items()
    }
    if "properties" in out:
        out["properties"] = {name: _close(sub) for name, sub in node["properties"].items()}
        if "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if out.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


@functools.cache
def crd_schema(schema_dir: Path, kind: str) -> dict:
    """The closed JSON Schema of `kind` from its CRD file in `schema_dir` (first served version)."""
    # The C loader reads the 1.4 MB CRD in well under a second; the pure-Python one takes several.
    crd = yaml.load(
        (schema_dir / CRD_FILES[kind]).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    )
    return _close(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"])


def _list_type(validator: Any, list_type: str, instance: Any, schema: dict) -> Any:
    """x-kubernetes-list-type: 'map' items are unique by their map keys, 'set' items are unique."""
    if not isinstance(instance, list):
        return
    if list_type == "set":
        seen = [item for i, item in enumerate(instance) if item in instance[:i]]
        for item in seen:
            yield jsonschema.ValidationError(f"duplicate item {item!r} in a list-type 'set'")
    elif list_type == "map":
        keys = schema.get("x-kubernetes-list-map-keys", [])
        tuples = [tuple(item.get(k) for k in keys) for item in instance if isinstance(item, dict)]
        for i, key in enumerate(tuples):
            if key in tuples[:i]:
                yield jsonschema.ValidationError(
                    f"duplicate entry {dict(zip(keys, key))} in a list keyed by {keys}"
                )


def _format_checker() -> jsonschema.FormatChecker:
    """Draft-7 formats plus the OpenAPI integer widths."""
    checker = jsonschema.FormatChecker()
    for name, (low, high) in INT_RANGES.items():
        checker.checks(name)(
            lambda value, low=low, high=high: not isinstance(value, int) or low <= value <= high
        )
    return checker


def check_crd(obj: dict, schema_dir: Path) -> CrdCheck:
    """Validate a RayJob / RayCluster against its CRD schema."""
    schema = crd_schema(schema_dir, obj["kind"])
    validator_class = jsonschema.validators.extend(
        jsonschema.Draft7Validator, {"x-kubernetes-list-type": _list_type}
    )
    validator = validator_class(schema, format_checker=_format_checker())
    name = f"{obj['kind']}/{obj['metadata']['name']}"
    errors = sorted(validator.iter_errors(obj), key=lambda e: [str(p) for p in e.absolute_path])
    return CrdCheck([f"{name} {e.json_path}: {e.message}" for e in errors], _cel_paths(obj, schema))


def _cel_paths(instance: Any, schema: dict, path: str = "$") -> list[tuple[str, str]]:
    """The CEL rules whose subject is present in the instance, with the JSON path of that subject."""
    found = [(path, rule["rule"]) for rule in schema.get("x-kubernetes-validations", [])]
    if isinstance(instance, dict):
        for name, value in instance.items():
            sub = schema.get("properties", {}).get(name)
            if sub is None and isinstance(schema.get("additionalProperties"), dict):
                sub = schema["additionalProperties"]
            if sub is not None:
                found += _cel_paths(value, sub, f"{path}.{name}")
    elif isinstance(instance, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(instance):
            found += _cel_paths(item, schema["items"], f"{path}[{index}]")
    return found


def check_core(obj: dict, versions: tuple[str, ...]) -> list[str]:
    """Validate a built-in object strictly (no unknown fields) with kubernetes-validate, for each version."""
    import kubernetes_validate

    errors = []
    for version in versions:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            where = "/".join(str(p) for p in error.absolute_path)
            errors.append(f"{obj['kind']}/{obj['metadata']['name']} (k8s {version}) {where}: {error.message}")
        except kubernetes_validate.SchemaNotFoundError:
            errors.append(
                f"{obj['kind']} {obj.get('apiVersion')}: no Kubernetes {version} schema for this kind"
            )
    return errors


def pod_templates(obj: dict) -> list[tuple[str, dict]]:
    """Every pod template of a RayJob / RayCluster as (where, template), submitter included."""
    spec = obj.get("spec", {})
    name = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
    found = []
    cluster = spec.get("rayClusterSpec", spec) if obj.get("kind") == "RayJob" else spec
    if "headGroupSpec" in cluster:
        found.append((f"{name} head", cluster["headGroupSpec"]["template"]))
    for group in cluster.get("workerGroupSpecs", []):
        found.append((f"{name} group {group.get('groupName')}", group["template"]))
    if "submitterPodTemplate" in spec:
        found.append((f"{name} submitter", spec["submitterPodTemplate"]))
    return found


def as_pod_template(template: dict) -> dict:
    """Wrap a pod template into a v1 PodTemplate object so that Kubernetes' own schema can check it."""
    return {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "template"}, "template": template}
