"""Every kustomization under k8s/ renders, validates against KubeRay's CRDs and Kubernetes' schemas,
passes KubeRay's own admission rules, and agrees with the image, the training config and the repository."""

from __future__ import annotations

import copy
import math
import shlex
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import yaml
from k8s_paths import K8S, KUSTOMIZATIONS, OVERLAYS, REPO_ROOT, SIZES
from k8s_policy import cluster_spec, gpus, kuberay_problems, ray_objects, wiring_problems
from k8s_schemas import as_pod_template, check_core, check_crd, pod_templates
from kustomize_lite import Rendering, load_kustomization

# The oldest Kubernetes this deployment claims (docs/CLUSTER.md) and the newest schema available.
K8S_VERSIONS = ("1.30", "1.37")
WORKLOAD_KINDS = {"": "RayJob", "/shards": "RayJob", "/cluster": "RayCluster"}
APP_ROOT = "/app/"  # where the Dockerfile copies the repository


def _ray(rendering: Rendering, kind: str | None = None) -> dict:
    """The one Ray object of a rendering (of the given kind)."""
    (obj,) = [o for o in ray_objects(rendering.objects) if kind in (None, o["kind"])]
    return obj


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_kustomization_renders_the_common_objects_and_one_workload(renderings: dict, name: str) -> None:
    kinds = sorted(obj["kind"] for obj in renderings[name].objects)
    workload = "RayCluster" if name.endswith("cluster") else "RayJob"
    assert kinds == sorted(["ServiceAccount", "PersistentVolumeClaim", "NetworkPolicy", workload])


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_ray_objects_match_the_kuberay_crd(renderings: dict, schema_dir: Path, name: str) -> None:
    result = check_crd(_ray(renderings[name]), schema_dir)
    assert result.errors == []
    # CEL rules are not evaluated here; the manifests stay clear of the fields that carry them.
    assert result.cel_rules == []


def test_crd_check_catches_mistakes(renderings: dict, schema_dir: Path) -> None:
    job = copy.deepcopy(_ray(renderings["overlays/multi-node"]))
    worker = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    worker["template"]["spec"]["containers"][0]["securityContxt"] = {}
    worker["template"]["spec"]["containers"][0]["env"].append({"name": "NCCL_DEBUG", "value": "INFO"})
    worker["replicas"] = 2**40
    job["spec"]["rayClusterSpec"]["authOptions"]["mode"] = "tokens"
    job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"][
        "limits"
    ]["cpu"] = "4 cores"
    job["spec"]["deletionStrategy"] = {"onSuccess": {"policy": "DeleteCluster"}}
    result = check_crd(job, schema_dir)
    text = "\n".join(result.errors)
    for expected in ("'securityContxt' was unexpected", "duplicate entry {'name': 'NCCL_DEBUG'}", "'int32'",
                     "'tokens' is not one of", "'4 cores' does not match"):  # fmt: skip
        assert expected in text
    assert [path for path, _ in result.cel_rules] == ["$.spec.deletionStrategy"] * 2


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_objects_match_kubernetes_schemas(renderings: dict, name: str) -> None:
    pytest.importorskip("kubernetes_validate", reason="kubernetes-validate ships Kubernetes' JSON schemas")
    errors = []
    for obj in renderings[name].objects:
        if obj["kind"] in ("RayJob", "RayCluster"):
            # The CRD leaves pod template metadata open; Kubernetes' PodTemplate schema checks all of it.
            for _, template in pod_templates(obj):
                errors += check_core(as_pod_template(template), K8S_VERSIONS)
        else:
            errors += check_core(obj, K8S_VERSIONS)
    assert errors == []


def test_kubernetes_schema_check_catches_mistakes(renderings: dict) -> None:
    pytest.importorskip("kubernetes_validate", reason="kubernetes-validate ships Kubernetes' JSON schemas")
    policy = copy.deepcopy([o for o in renderings["base/train"].objects if o["kind"] == "NetworkPolicy"][0])
    policy["spec"]["ingres"] = policy["spec"].pop("ingress")
    template = copy.deepcopy(
        _ray(renderings["base/train"])["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]
    )
    template["metadata"]["labels"]["replicas"] = 2
    assert "'ingres' was unexpected" in " ".join(check_core(policy, K8S_VERSIONS[:1]))
    assert "2 is not of type 'string'" in " ".join(check_core(as_pod_template(template), K8S_VERSIONS[:1]))


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_kuberay_admission_rules_and_pod_wiring(renderings: dict, name: str) -> None:
    obj = _ray(renderings[name])
    assert kuberay_problems(obj) + wiring_problems(obj) == []


def test_kuberay_rules_catch_mistakes(renderings: dict) -> None:
    job = copy.deepcopy(_ray(renderings["overlays/multi-node"]))
    job["metadata"]["name"] = "longcat-train-" + "x" * 40
    job["spec"]["rayClusterSpec"]["rayVersion"] = "2.51.0"
    job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["minReplicas"] = 3
    job["spec"]["rayClusterSpec"]["workerGroupSpecs"][1]["rayStartParams"]["labels"] = "a=b"
    del job["spec"]["activeDeadlineSeconds"]
    job["spec"]["shutdownAfterJobFinishes"] = False
    volumes = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["volumes"]
    volumes[:] = [v for v in volumes if v["name"] != "dshm"]
    text = "\n".join(kuberay_problems(job) + wiring_problems(job))
    expected = ("at most 47 characters", "rayVersion >= 2.52.0", "minReplicas <= replicas",
                "rayStartParams['labels']", "activeDeadlineSeconds", "shutdownAfterJobFinishes",
                "unknown volume 'dshm'", "/dev/shm")  # fmt: skip
    for line in expected:
        assert line in text


def _settings(size: str) -> dict:
    """The settings component of an overlay."""
    return load_kustomization(K8S / "overlays" / size / "settings", "Component")


@pytest.mark.parametrize("size", SIZES)
def test_every_settings_patch_changes_a_workload(renderings: dict, size: str) -> None:
    # kustomize silently skips a patch whose target is absent; here every one must apply somewhere.
    path = K8S / "overlays" / size / "settings" / "kustomization.yaml"
    uses = {f"{path}#{i}": 0 for i in range(len(_settings(size)["patches"]))}
    for name in OVERLAYS:
        for key, count in renderings[name].patch_uses.items():
            if key in uses:
                uses[key] += count
    assert uses and all(count == 1 for count in uses.values()), uses


@pytest.mark.parametrize("size", SIZES)
def test_images_come_from_the_settings_component(renderings: dict, size: str) -> None:
    (image,) = _settings(size)["images"]
    expected = f"{image['newName']}:{image['newTag']}"
    assert image["newTag"] not in ("", "latest")
    for part in WORKLOAD_KINDS:
        for _, template in pod_templates(_ray(renderings[f"overlays/{size}{part}"])):
            assert {c["image"] for c in template["spec"]["containers"]} == {expected}


def _pins() -> dict[str, str]:
    """Exact versions of k8s/image/constraints.txt."""
    lines = (K8S / "image" / "constraints.txt").read_text().splitlines()
    return dict(line.split("==") for line in lines if line and not line.startswith("#"))


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_ray_version_matches_the_image(renderings: dict, name: str) -> None:
    assert cluster_spec(_ray(renderings[name]))["rayVersion"] == _pins()["ray"]


def _module_file(module: str) -> Path:
    """The source file of a dotted module name in this repository (a module or a package's __main__)."""
    base = REPO_ROOT / module.replace(".", "/")
    return base.with_suffix(".py") if not base.is_dir() else base / "__main__.py"


def _entrypoint_target(command: list[str]) -> Path:
    """The file a RayJob entrypoint runs: `python -m MODULE` or a console script of the installed package."""
    if command[:2] == ["python", "-m"]:
        return _module_file(command[2])
    scripts = entry_points(group="console_scripts", name=command[0])
    assert scripts, (
        f"{command[0]} is neither `python -m` nor a console script of longcat-dist (pyproject.toml)"
    )
    return _module_file(next(iter(scripts)).module)


@pytest.mark.parametrize("name", [n for n in KUSTOMIZATIONS if not n.endswith("cluster")])
def test_entrypoint_names_a_module_and_a_config_of_the_repository(renderings: dict, name: str) -> None:
    command = shlex.split(_ray(renderings[name], "RayJob")["spec"]["entrypoint"])
    config = command[command.index("--config") + 1]
    assert config.startswith(APP_ROOT), "configs are read from the image's copy of the repository"
    assert (REPO_ROOT / config.removeprefix(APP_ROOT)).is_file(), config
    target = _entrypoint_target(command)
    assert target.is_file(), f"{' '.join(command[:3])}: {target.relative_to(REPO_ROOT)} does not exist (yet)"


def _overrides(entrypoint: str) -> dict:
    """The config overrides of a launch.train command line, parsed by launch.train's own parser."""
    from launch.train import build_parser, parse_overrides

    words = shlex.split(entrypoint)
    assert words[:3] == ["python", "-m", "launch.train"], entrypoint
    return parse_overrides(build_parser().parse_args(words[3:]).set)


@pytest.mark.parametrize("name", [n for n in KUSTOMIZATIONS if n.endswith(("base/train", "-node"))])
def test_training_entrypoint_is_accepted_by_launch_train(renderings: dict, name: str) -> None:
    # Parse the command line the way the job's driver will, and load the config with its overrides.
    from launch.train import build_parser, parse_overrides
    from longcat_dist.config import load_config

    words = shlex.split(_ray(renderings[name])["spec"]["entrypoint"])
    try:
        args = build_parser().parse_args(words[3:])
    except SystemExit:
        pytest.fail(f"{name}: launch.train rejects the entrypoint arguments {words[3:]}")
    cfg = load_config(REPO_ROOT / args.config.removeprefix(APP_ROOT), parse_overrides(args.set))
    assert cfg.num_workers == int(_overrides(" ".join(words))["num_workers"])


def _group(obj: dict, name: str) -> dict:
    """A worker group by name."""
    (group,) = [g for g in cluster_spec(obj)["workerGroupSpecs"] if g["groupName"] == name]
    return group


def _cpus(template: dict) -> float:
    """CPU limit of the pod's first container, in cores."""
    cpu = str(template["spec"]["containers"][0]["resources"]["limits"]["cpu"])
    return int(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu)


@pytest.mark.parametrize("name", [n for n in KUSTOMIZATIONS if n.endswith(("base/train", "-node"))])
def test_training_cluster_has_a_gpu_per_worker(renderings: dict, cluster_config: dict, name: str) -> None:
    job = _ray(renderings[name])
    config = {**cluster_config, **_overrides(job["spec"]["entrypoint"])}
    workers, gpus_per_worker = int(config["num_workers"]), float(config["gpus_per_worker"])
    train, validate = _group(job, "gpu-train"), _group(job, "gpu-validate")
    assert train["replicas"] * gpus(train["template"]) == math.ceil(workers * gpus_per_worker)
    assert validate["replicas"] * gpus(validate["template"]) >= float(config["validation_num_gpus"])
    # Ray Train reserves cpus_per_worker CPUs next to each GPU.
    per_pod = gpus(train["template"]) / gpus_per_worker
    assert _cpus(train["template"]) >= per_pod * float(config["cpus_per_worker"])


@pytest.mark.parametrize("size", SIZES)
def test_long_lived_cluster_can_grow_to_the_training_size(
    renderings: dict, cluster_config: dict, size: str
) -> None:
    cluster = _ray(renderings[f"overlays/{size}/cluster"])
    train_workers = int(_overrides(_ray(renderings[f"overlays/{size}"])["spec"]["entrypoint"])["num_workers"])
    gpu, validate = _group(cluster, "gpu"), _group(cluster, "gpu-validate")
    assert gpu["maxReplicas"] * gpus(gpu["template"]) >= train_workers * float(
        cluster_config["gpus_per_worker"]
    )
    assert validate["maxReplicas"] * gpus(validate["template"]) >= float(
        cluster_config["validation_num_gpus"]
    )
    assert all(group["minReplicas"] == 0 for group in cluster_spec(cluster)["workerGroupSpecs"])


@pytest.mark.parametrize("size", SIZES)
def test_shard_build_has_cpu_decoders_and_gpu_encoders(renderings: dict, size: str) -> None:
    job = _ray(renderings[f"overlays/{size}/shards"])
    decode, encode = _group(job, "cpu-decode"), _group(job, "gpu-encode")
    assert gpus(decode["template"]) == 0 and decode["rayStartParams"]["num-gpus"] == "0"
    assert gpus(encode["template"]) >= 1 and decode["replicas"] >= 1 and encode["replicas"] >= 1


def test_every_manifest_file_is_used_and_parses() -> None:
    # A YAML file that no kustomization lists would never reach the cluster.
    listed = set()
    for kustomization in K8S.rglob("kustomization.yaml"):
        spec = yaml.safe_load(kustomization.read_text())
        listed |= {(kustomization.parent / r).resolve() for r in spec.get("resources", [])}
        listed.add(kustomization.resolve())
    for path in K8S.rglob("*.yaml"):
        assert path.resolve() in listed, f"{path.relative_to(REPO_ROOT)} is not listed by any kustomization"
        assert list(yaml.safe_load_all(path.read_text()))
