"""docs/CLUSTER.md covers the whole path and every command in it names paths and objects that exist."""

from __future__ import annotations

import re

import pytest
from k8s_paths import K8S, REPO_ROOT, SIZES
from kustomize_lite import load_kustomization

DOC = (REPO_ROOT / "docs" / "CLUSTER.md").read_text()
RAY_DOCS = "https://docs.ray.io/en/latest/ray-security/token-auth.html"


@pytest.mark.parametrize(
    "needed",
    [
        "ray start --head",
        "ray job submit --address http://127.0.0.1:8265 --working-dir . --runtime-env launch/runtime_env.yaml",
        "-- python -m launch.train --config configs/cluster/config.json",
        "-- longcat-shards build --config configs/cluster/multidatabackend.json",
        "ray job logs -f",
        "ray job stop",
        "kubectl apply -k k8s/overlays/multi-node",
        "kubectl port-forward",
        "docker build -t",
        "RAY_AUTH_MODE=token",
        "ray get-auth-token --generate",
        "helm install kuberay-operator",
        RAY_DOCS,
    ],
)
def test_cluster_doc_covers(needed: str) -> None:
    assert needed in DOC


def test_every_kustomize_path_in_the_doc_exists() -> None:
    paths = set(re.findall(r"kubectl (?:apply|delete) -k ([^\s`]+)", DOC))
    assert "k8s/overlays/multi-node" in paths
    for path in paths:
        resolved = path.replace("<size>", SIZES[0])
        assert (REPO_ROOT / resolved / "kustomization.yaml").is_file(), path


def test_every_repository_file_the_doc_names_exists() -> None:
    names = set(re.findall(r"`((?:k8s|configs|docs|tests)/[\w./-]+)`", DOC))
    assert names, "the doc names no repository files"
    missing = [name for name in names if not (REPO_ROOT / name.replace("<size>", SIZES[0])).exists()]
    assert missing == []


@pytest.mark.parametrize("size", SIZES)
def test_doc_build_command_produces_the_image_the_overlays_use(size: str) -> None:
    (image,) = load_kustomization(K8S / "overlays" / size / "settings", "Component")["images"]
    assert f"docker build -t {image['newName']}:{image['newTag']} ." in DOC
