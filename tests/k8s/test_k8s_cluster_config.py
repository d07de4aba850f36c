"""configs/cluster/ loads with the project's own loader and only names paths that the pods mount."""

from __future__ import annotations

from pathlib import Path

import pytest
from k8s_paths import REPO_ROOT
from k8s_policy import ray_objects
from k8s_schemas import pod_templates

from longcat_dist.config import load_config, load_data_backends

CONFIG = REPO_ROOT / "configs" / "cluster" / "config.json"
BACKENDS = REPO_ROOT / "configs" / "cluster" / "multidatabackend.json"


def _shared_mounts(obj: dict) -> set[str]:
    """Mount paths of the PersistentVolumeClaims that every pod of a Ray object mounts."""
    mounts = None
    for _, template in pod_templates(obj):
        if template["spec"]["containers"][0]["name"] == "ray-job-submitter":
            continue
        claims = {v["name"] for v in template["spec"].get("volumes", []) if "persistentVolumeClaim" in v}
        paths = {
            m["mountPath"] for m in template["spec"]["containers"][0]["volumeMounts"] if m["name"] in claims
        }
        mounts = paths if mounts is None else mounts & paths
    return mounts or set()


def _on(path: Path | str, mounts: set[str]) -> bool:
    """Whether an absolute path lies on one of the mounts."""
    return any(Path(path).is_relative_to(mount) for mount in mounts)


def test_cluster_config_loads_with_load_config() -> None:
    config = load_config(CONFIG)
    assert config.resume_from_checkpoint == "latest", "rerunning the same job must resume"
    assert config.validation_using_datasets and config.eval_dataset_id is not None
    assert [ds.id for ds in config.train_datasets] == ["edit-clips"]


@pytest.mark.parametrize(
    "workload", ["overlays/multi-node", "overlays/multi-node/shards", "overlays/multi-node/cluster"]
)
def test_every_config_path_is_on_the_shared_volume(
    renderings: dict, cluster_config: dict, workload: str
) -> None:
    # Checkpoints, weights and shards must be visible from every pod, or a resumed job starts over.
    (obj,) = ray_objects(renderings[workload].objects)
    mounts = _shared_mounts(obj)
    assert mounts == {"/data"}
    keys = ("pretrained_model_name_or_path", "output_dir", "storage_path")
    paths = [cluster_config[key] for key in keys]
    for ds in load_data_backends(BACKENDS):
        paths += [path for path in (ds.instance_data_dir, ds.cache_dir_vae, ds.cache_dir) if path is not None]
    assert [path for path in paths if not _on(path, mounts)] == []
