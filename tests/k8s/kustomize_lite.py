"""A small kustomize (resources, components, JSON6902 patches, images): renders k8s/ without the binary.

It follows `kustomize build` for the features k8s/ uses and refuses every other key, so a manifest that
needs more fails here loudly instead of rendering differently from the real tool.
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

KUSTOMIZE_API = "kustomize.config.k8s.io"
KINDS = {"Kustomization": f"{KUSTOMIZE_API}/v1beta1", "Component": f"{KUSTOMIZE_API}/v1alpha1"}
KEYS = {"apiVersion", "kind", "resources", "components", "patches", "images"}
PATCH_KEYS = {"target", "patch"}
TARGET_KEYS = {"kind", "name"}
IMAGE_KEYS = {"name", "newName", "newTag"}
JSON_PATCH_OPS = {"add", "remove", "replace", "test"}
# kustomize's image transformer rewrites `image` inside any list under these keys, at any depth, in any kind.
CONTAINER_LISTS = ("containers", "initContainers")


class KustomizeError(ValueError):
    """A kustomization or patch that the real tool would reject (or that this one cannot render the same)."""


@dataclass
class Rendering:
    """The objects a kustomization builds, and how many objects each patch changed (keyed 'file#index')."""

    objects: list[dict] = field(default_factory=list)
    patch_uses: Counter = field(default_factory=Counter)


def render(directory: str | Path) -> Rendering:
    """Build the kustomization in `directory` like `kustomize build`."""
    out = Rendering()
    _build(Path(directory).resolve(), "Kustomization", out)
    _check_unique(out.objects, Path(directory))
    return out


def load_kustomization(directory: Path, kind: str) -> dict:
    """Read and structurally check kustomization.yaml: known keys only, the right kind and apiVersion."""
    path = directory / "kustomization.yaml"
    if not path.is_file():
        raise KustomizeError(f"{directory}: no kustomization.yaml")
    spec = yaml.safe_load(path.read_text()) or {}
    unknown = set(spec) - KEYS
    if unknown:
        raise KustomizeError(f"{path}: keys {sorted(unknown)} are not supported here (only {sorted(KEYS)})")
    if spec.get("kind") != kind or spec.get("apiVersion") != KINDS[kind]:
        got = f"{spec.get('apiVersion')}/{spec.get('kind')}"
        raise KustomizeError(f"{path}: expected apiVersion {KINDS[kind]} kind {kind}, got {got}")
    for key in ("resources", "components", "patches", "images"):
        if not isinstance(spec.get(key, []), list):
            raise KustomizeError(f"{path}: '{key}' must be a list")
    return spec


def _build(directory: Path, kind: str, out: Rendering) -> None:
    """Accumulate resources, then components, then this kustomization's own transformers (as kustomize)."""
    spec = load_kustomization(directory, kind)
    path = directory / "kustomization.yaml"
    for entry in spec.get("resources", []):
        target = (directory / entry).resolve()
        if target.is_dir():
            _build(target, "Kustomization", out)
        elif target.is_file():
            out.objects.extend(doc for doc in yaml.safe_load_all(target.read_text()) if doc is not None)
        else:
            raise KustomizeError(f"{path}: resource '{entry}' does not exist")
    for entry in spec.get("components", []):
        component = (directory / entry).resolve()
        if not component.is_dir():
            raise KustomizeError(f"{path}: component '{entry}' is not a directory")
        _build(component, "Component", out)
    for index, patch in enumerate(spec.get("patches", [])):
        out.patch_uses[f"{path}#{index}"] += _apply_patch(patch, out.objects, f"{path} patches[{index}]")
    for index, image in enumerate(spec.get("images", [])):
        _set_image(image, out.objects, f"{path} images[{index}]")


def _apply_patch(patch: Any, objects: list[dict], where: str) -> int:
    """Apply one JSON6902 patch to every object its target selects; return how many it changed."""
    if not isinstance(patch, dict) or set(patch) != PATCH_KEYS:
        raise KustomizeError(f"{where}: a patch here is {{target, patch}} (inline); got {patch!r}")
    target = patch["target"]
    if not isinstance(target, dict) or not target or set(target) - TARGET_KEYS:
        raise KustomizeError(f"{where}: target selects by {sorted(TARGET_KEYS)} only; got {target!r}")
    ops = yaml.safe_load(patch["patch"])
    if not isinstance(ops, list):
        raise KustomizeError(f"{where}: only JSON6902 patches (a list of operations) are supported")
    hits = 0
    for index, obj in enumerate(objects):
        if all(_field(obj, key) == value for key, value in target.items()):
            objects[index] = apply_json_patch(obj, ops, where)
            hits += 1
    return hits


def _field(obj: dict, key: str) -> Any:
    """A target selector's view of an object: kind at the top, name under metadata."""
    return obj.get("kind") if key == "kind" else obj.get("metadata", {}).get("name")


def apply_json_patch(document: Any, ops: list, where: str = "patch") -> Any:
    """RFC 6902 add / remove / replace / test on a copy of `document`."""
    result = copy.deepcopy(document)
    for number, op in enumerate(ops):
        here = f"{where} op {number}"
        if not isinstance(op, dict) or op.get("op") not in JSON_PATCH_OPS or "path" not in op:
            raise KustomizeError(f"{here}: expected {{op: {'|'.join(sorted(JSON_PATCH_OPS))}, path, ...}}")
        if op["op"] != "remove" and "value" not in op:
            raise KustomizeError(f"{here}: '{op['op']}' needs a value")
        result = _apply_op(result, op, here)
    return result


def _apply_op(document: Any, op: dict, where: str) -> Any:
    """One operation; the whole document is replaced when the path is the root ('')."""
    tokens = _pointer(op["path"], where)
    if not tokens:
        if op["op"] == "test":
            _test(document, op["value"], op["path"], where)
            return document
        if op["op"] == "remove":
            raise KustomizeError(f"{where}: cannot remove the whole document")
        return copy.deepcopy(op["value"])
    parent = document
    for token in tokens[:-1]:
        parent = _child(parent, token, op["path"], where)
    last = tokens[-1]
    if op["op"] == "test":
        _test(_child(parent, last, op["path"], where), op["value"], op["path"], where)
    elif isinstance(parent, list):
        _list_op(parent, last, op, where)
    elif isinstance(parent, dict):
        if op["op"] in ("replace", "remove") and last not in parent:
            raise KustomizeError(f"{where}: '{op['op']}' at {op['path']}: no such member")
        if op["op"] == "remove":
            del parent[last]
        else:
            parent[last] = copy.deepcopy(op["value"])
    else:
        raise KustomizeError(f"{where}: {op['path']} goes through a scalar")
    return document


def _list_op(items: list, token: str, op: dict, where: str) -> None:
    """add (insert, or append with '-'), replace or remove one list element."""
    if op["op"] == "add" and token == "-":
        items.append(copy.deepcopy(op["value"]))
        return
    index = _index(token, len(items) + (op["op"] == "add"), op["path"], where)
    if op["op"] == "add":
        items.insert(index, copy.deepcopy(op["value"]))
    elif op["op"] == "replace":
        items[index] = copy.deepcopy(op["value"])
    else:
        del items[index]


def _pointer(path: Any, where: str) -> list[str]:
    """Split a JSON pointer into unescaped tokens (~1 is '/', ~0 is '~')."""
    if not isinstance(path, str) or (path and not path.startswith("/")):
        raise KustomizeError(f"{where}: path {path!r} is not a JSON pointer (it must start with '/')")
    return [t.replace("~1", "/").replace("~0", "~") for t in path.split("/")[1:]]


def _child(node: Any, token: str, path: str, where: str) -> Any:
    """Step into a dict member or list element, or raise naming the path."""
    if isinstance(node, dict):
        if token not in node:
            raise KustomizeError(f"{where}: {path}: no member '{token}'")
        return node[token]
    if isinstance(node, list):
        return node[_index(token, len(node), path, where)]
    raise KustomizeError(f"{where}: {path} goes through a scalar at '{token}'")


def _index(token: str, size: int, path: str, where: str) -> int:
    """A list index token, in range."""
    if not token.isdigit() or (len(token) > 1 and token.startswith("0")) or int(token) >= size:
        raise KustomizeError(f"{where}: {path}: '{token}' is not an index below {size}")
    return int(token)


def _test(actual: Any, expected: Any, path: str, where: str) -> None:
    """The RFC 6902 'test' operation: the patch fails unless the value is equal."""
    if actual != expected:
        raise KustomizeError(f"{where}: test failed at {path}: expected {expected!r}, found {actual!r}")


def _set_image(image: Any, objects: list[dict], where: str) -> None:
    """Rewrite name and tag of every container image whose name (without tag or digest) matches."""
    if not isinstance(image, dict) or "name" not in image or set(image) - IMAGE_KEYS:
        raise KustomizeError(f"{where}: an image entry is {{name, newName?, newTag?}}; got {image!r}")
    for obj in objects:
        for container in _containers(obj):
            name, tag = split_image(str(container.get("image", "")))
            if name == image["name"]:
                new_tag = image.get("newTag", tag)
                container["image"] = image.get("newName", name) + (f":{new_tag}" if new_tag else "")


def _containers(node: Any) -> list[dict]:
    """Every container object under a 'containers' or 'initContainers' list, at any depth."""
    found: list[dict] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in CONTAINER_LISTS and isinstance(value, list):
                found.extend(item for item in value if isinstance(item, dict))
            else:
                found.extend(_containers(value))
    elif isinstance(node, list):
        for item in node:
            found.extend(_containers(item))
    return found


def split_image(reference: str) -> tuple[str, str]:
    """'registry:5000/team/app:1.2' -> ('registry:5000/team/app', '1.2'); the tag is '' when absent."""
    reference = reference.split("@", 1)[0]
    slash = reference.rfind("/")
    colon = reference.rfind(":")
    if colon > slash:
        return reference[:colon], reference[colon + 1 :]
    return reference, ""


def _check_unique(objects: list[dict], directory: Path) -> None:
    """kustomize refuses two objects with the same kind and name (and namespace)."""
    seen: set[tuple] = set()
    for obj in objects:
        meta = obj.get("metadata", {})
        key = (obj.get("kind"), meta.get("namespace"), meta.get("name"))
        if key in seen:
            raise KustomizeError(f"{directory}: {key[0]} '{key[2]}' is defined twice")
        seen.add(key)
