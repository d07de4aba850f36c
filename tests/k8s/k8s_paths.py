"""Paths and names shared by the k8s/ tests (conftest.py holds only fixtures: `import conftest` is ambiguous)."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
K8S = REPO_ROOT / "k8s"
# In CI and on developer machines shared/ sits beside the repository.
SCHEMA_DIR = REPO_ROOT.parent / "shared" / "schemas" / "kuberay"
SIZES = ("single-node", "multi-node")
BASES = ("base/train", "base/shards", "base/cluster")
OVERLAYS = tuple(f"overlays/{size}{part}" for size in SIZES for part in ("", "/shards", "/cluster"))
KUSTOMIZATIONS = BASES + OVERLAYS
