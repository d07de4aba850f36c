"""Fixtures for the k8s/ tests: every rendered kustomization, the KubeRay CRD schemas, the cluster config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from k8s_paths import K8S, KUSTOMIZATIONS, REPO_ROOT, SCHEMA_DIR
from kustomize_lite import Rendering, render


@pytest.fixture(scope="session")
def renderings() -> dict[str, Rendering]:
    """Every kustomization under k8s/, rendered once."""
    return {name: render(K8S / name) for name in KUSTOMIZATIONS}


@pytest.fixture(scope="session")
def schema_dir() -> Path:
    """The directory of the KubeRay CRDs (skips, with the reason, where shared/ is not beside the repo)."""
    if not SCHEMA_DIR.is_dir():
        pytest.skip(f"KubeRay CRD schemas not found at {SCHEMA_DIR}: shared/ must sit beside the repository")
    return SCHEMA_DIR


@pytest.fixture(scope="session")
def cluster_config() -> dict:
    """configs/cluster/config.json as written (the raw keys, before load_config)."""
    return json.loads((REPO_ROOT / "configs" / "cluster" / "config.json").read_text())
