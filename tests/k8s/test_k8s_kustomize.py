"""The small kustomize used to render k8s/: JSON6902 operations, images, components and refusals."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from kustomize_lite import KustomizeError, apply_json_patch, render, split_image


def _write(directory: Path, files: dict[str, str]) -> None:
    """Write dedented files under directory, creating folders."""
    for name, text in files.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def test_json_patch_add_replace_remove_and_escapes() -> None:
    doc = {"limits": {"nvidia.com/gpu": 1, "cpu": "4"}, "groups": [{"name": "a"}], "tags": ["x"]}
    ops = [
        {"op": "replace", "path": "/limits/nvidia.com~1gpu", "value": 8},
        {"op": "add", "path": "/groups/0", "value": {"name": "first"}},
        {"op": "add", "path": "/tags/-", "value": "y"},
        {"op": "remove", "path": "/limits/cpu"},
        {"op": "add", "path": "/limits/a~0b", "value": 1},
        {"op": "test", "path": "/groups/1/name", "value": "a"},
    ]
    patched = apply_json_patch(doc, ops)
    assert patched == {
        "limits": {"nvidia.com/gpu": 8, "a~b": 1},
        "groups": [{"name": "first"}, {"name": "a"}],
        "tags": ["x", "y"],
    }
    assert doc["limits"] == {"nvidia.com/gpu": 1, "cpu": "4"}, "the input must not change"
    assert apply_json_patch(doc, [{"op": "replace", "path": "", "value": [1]}]) == [1]


@pytest.mark.parametrize(
    ("op", "message"),
    [
        ({"op": "test", "path": "/groups/0/name", "value": "b"}, "test failed at /groups/0/name"),
        ({"op": "replace", "path": "/missing", "value": 1}, "no such member"),
        ({"op": "replace", "path": "/groups/3", "value": 1}, "not an index below 1"),
        ({"op": "replace", "path": "/groups/01", "value": 1}, "not an index"),
        ({"op": "move", "from": "/a", "path": "/b"}, "expected {op:"),
        ({"op": "add", "path": "groups"}, "needs a value"),
        ({"op": "add", "path": "groups", "value": 1}, "not a JSON pointer"),
        ({"op": "replace", "path": "/groups/0/name/x", "value": 1}, "goes through a scalar"),
        ({"op": "remove", "path": ""}, "cannot remove the whole document"),
    ],
)
def test_json_patch_refuses_what_kustomize_refuses(op: dict, message: str) -> None:
    with pytest.raises(KustomizeError, match=message.replace("{", r"\{")):
        apply_json_patch({"groups": [{"name": "a"}]}, [op], "p.yaml")


@pytest.mark.parametrize(
    ("reference", "expected"),
    [
        ("longcat-dist:0.1.0", ("longcat-dist", "0.1.0")),
        ("registry:5000/team/app:1.2", ("registry:5000/team/app", "1.2")),
        ("registry:5000/team/app", ("registry:5000/team/app", "")),
        ("app@sha256:abc", ("app", "")),
    ],
)
def test_split_image(reference: str, expected: tuple[str, str]) -> None:
    assert split_image(reference) == expected


def test_render_resources_components_images_and_patch_counts(tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            "base/kustomization.yaml": """
                apiVersion: kustomize.config.k8s.io/v1beta1
                kind: Kustomization
                resources: [job.yaml]
            """,
            "base/job.yaml": """
                apiVersion: ray.io/v1
                kind: RayJob
                metadata: {name: job}
                spec:
                  rayClusterSpec:
                    headGroupSpec:
                      template:
                        spec:
                          initContainers: [{name: init, image: app:1}]
                          containers: [{name: head, image: app:1}, {name: side, image: other:2}]
            """,
            "overlay/kustomization.yaml": """
                apiVersion: kustomize.config.k8s.io/v1beta1
                kind: Kustomization
                resources: [../base]
                components: [settings]
            """,
            "overlay/settings/kustomization.yaml": """
                apiVersion: kustomize.config.k8s.io/v1alpha1
                kind: Component
                images: [{name: app, newName: reg.io/app, newTag: "9"}]
                patches:
                  - target: {kind: RayJob, name: job}
                    patch: '[{op: add, path: /spec/entrypoint, value: run}]'
                  - target: {kind: RayCluster, name: absent}
                    patch: '[{op: add, path: /spec/x, value: 1}]'
            """,
        },
    )
    rendering = render(tmp_path / "overlay")
    (job,) = rendering.objects
    template = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert job["spec"]["entrypoint"] == "run"
    assert [c["image"] for c in template["initContainers"] + template["containers"]] == [
        "reg.io/app:9",
        "reg.io/app:9",
        "other:2",
    ]
    settings = tmp_path / "overlay" / "settings" / "kustomization.yaml"
    assert rendering.patch_uses == {f"{settings}#0": 1, f"{settings}#1": 0}


@pytest.mark.parametrize(
    ("kustomization", "message"),
    [
        (
            "kind: Kustomization\napiVersion: kustomize.config.k8s.io/v1beta1\ncommonLabels: {a: b}\n",
            "commonLabels",
        ),
        ("kind: Component\napiVersion: kustomize.config.k8s.io/v1alpha1\n", "expected apiVersion"),
        (
            "kind: Kustomization\napiVersion: kustomize.config.k8s.io/v1beta1\nresources: [nope.yaml]\n",
            "nope.yaml",
        ),
        (
            "kind: Kustomization\napiVersion: kustomize.config.k8s.io/v1beta1\nresources: [a.yaml]\n"
            "patches: [{target: {kind: A}, patch: 'spec: {x: 1}'}]\n",
            "only JSON6902",
        ),
        (
            "kind: Kustomization\napiVersion: kustomize.config.k8s.io/v1beta1\nresources: [a.yaml]\n"
            "patches: [{target: {labelSelector: x}, patch: '[]'}]\n",
            "target selects by",
        ),
        (
            "kind: Kustomization\napiVersion: kustomize.config.k8s.io/v1beta1\nresources: [a.yaml, a.yaml]\n",
            "twice",
        ),
    ],
)
def test_render_refuses_unsupported_or_broken_kustomizations(
    tmp_path: Path, kustomization: str, message: str
) -> None:
    _write(tmp_path, {"kustomization.yaml": kustomization, "a.yaml": "kind: A\nmetadata: {name: a}\n"})
    with pytest.raises(KustomizeError, match=message):
        render(tmp_path)
