"""Security of the rendered manifests: nothing exposed, token auth everywhere, non-root read-only pods,
exact GPU reservations, no credentials in literals, and an ingress policy that admits only Ray pods."""

from __future__ import annotations

import copy
import re

import pytest
from k8s_paths import KUSTOMIZATIONS, REPO_ROOT
from k8s_policy import (
    auth_problems,
    exposure_problems,
    gpu_placement_problems,
    gpus,
    network_policy_problems,
    pod_security_problems,
    ray_objects,
    resource_problems,
    runtime_env_problems,
    secret_literal_problems,
)
from k8s_schemas import pod_templates

CHECKS = (auth_problems, pod_security_problems, resource_problems, secret_literal_problems)


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_rendered_manifests_pass_every_security_check(renderings: dict, name: str) -> None:
    objects = renderings[name].objects
    problems = exposure_problems(objects) + network_policy_problems(objects)
    for obj in ray_objects(objects):
        problems += [line for check in CHECKS for line in check(obj)]
    assert problems == []


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_token_auth_env_is_on_head_and_every_worker(renderings: dict, name: str) -> None:
    # Stated on its own because it is the rule that keeps other tenants from running code on the cluster.
    (obj,) = ray_objects(renderings[name].objects)
    for where, template in pod_templates(obj):
        env = {e["name"]: e for e in template["spec"]["containers"][0]["env"]}
        assert env["RAY_AUTH_MODE"] == {"name": "RAY_AUTH_MODE", "value": "token"}, where
        assert set(env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]) == {"name", "key"}, where


def _job(renderings: dict) -> dict:
    """A private copy of the multi-node training RayJob to break."""
    (job,) = ray_objects(renderings["overlays/multi-node"].objects)
    return copy.deepcopy(job)


def _worker(job: dict) -> dict:
    """The first worker container of a RayJob."""
    return job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]


def test_exposure_check_catches_load_balancers_and_ingresses(renderings: dict) -> None:
    job = _job(renderings)
    job["spec"]["rayClusterSpec"]["headGroupSpec"]["serviceType"] = "NodePort"
    service = {"kind": "Service", "metadata": {"name": "dash"}, "spec": {"type": "LoadBalancer"}}
    ingress = {"kind": "Ingress", "metadata": {"name": "dash"}}
    text = "\n".join(exposure_problems([job, service, ingress]))
    assert "'NodePort'" in text and "Service type LoadBalancer" in text and "an Ingress" in text


def test_auth_check_catches_a_literal_or_missing_token(renderings: dict) -> None:
    job = _job(renderings)
    env = _worker(job)["env"]
    token = next(e for e in env if e["name"] == "RAY_AUTH_TOKEN")
    token.pop("valueFrom")
    token["value"] = "not-from-a-secret"
    job["spec"]["rayClusterSpec"]["workerGroupSpecs"][1]["template"]["spec"]["containers"][0]["env"] = []
    text = "\n".join(auth_problems(job))
    assert "gpu-train ray-worker: RAY_AUTH_TOKEN must come from a secretKeyRef" in text
    assert "gpu-validate ray-worker: RAY_AUTH_MODE must be 'token'" in text
    assert "RAY_AUTH_TOKEN looks like a credential" in "\n".join(secret_literal_problems(job))


def test_pod_security_check_catches_root_escalation_and_writable_roots(renderings: dict) -> None:
    job = _job(renderings)
    worker = _worker(job)
    worker["securityContext"]["runAsNonRoot"] = False
    del worker["securityContext"]["allowPrivilegeEscalation"]
    worker["securityContext"]["capabilities"]["add"] = ["IPC_LOCK"]
    worker["volumeMounts"] = [m for m in worker["volumeMounts"] if m["mountPath"] != "/tmp"]
    job["spec"]["submitterPodTemplate"]["spec"]["automountServiceAccountToken"] = True
    job["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["securityContext"][
        "readOnlyRootFilesystem"
    ] = False
    text = "\n".join(pod_security_problems(job))
    for expected in ("runAsNonRoot must be true", "allowPrivilegeEscalation must be false", "add none",
                     "writable /tmp", "submitter: automountServiceAccountToken must be false",
                     "ray-job-submitter: readOnlyRootFilesystem must be true"):  # fmt: skip
        assert expected in text


def test_resource_check_catches_gpu_requests_below_limits(renderings: dict) -> None:
    job = _job(renderings)
    _worker(job)["resources"]["requests"]["nvidia.com/gpu"] = 4
    assert resource_problems(job) == [
        "RayJob/longcat-train group gpu-train ray-worker: nvidia.com/gpu request 4 != limit 8"
    ]


@pytest.mark.parametrize(
    ("entry", "runtime_env"),
    [
        ({"name": "AWS_SECRET_ACCESS_KEY", "value": "abc"}, None),
        ({"name": "S3_ENDPOINT", "value": "https://user:pa55@minio.local"}, None),
        ({"name": "NOTE", "value": "AKIAABCDEFGHIJKLMNOP"}, None),
        (None, "env_vars:\n  HF_TOKEN: hf_abcdefghijklmnopqrstuvwx\n"),
        (None, "working_dir: https://me:ghp_abcdefghijklmnopqrstuvwxyz@github.com/x.zip\n"),
    ],
)
def test_secret_check_catches_credentials_in_literals(
    renderings: dict, entry: dict | None, runtime_env: str | None
) -> None:
    job = _job(renderings)
    if entry is not None:
        _worker(job)["env"].append(entry)
    if runtime_env is not None:
        job["spec"]["runtimeEnvYAML"] = runtime_env
    assert len(secret_literal_problems(job)) == 1


def test_network_policy_check_catches_open_rules(renderings: dict) -> None:
    objects = copy.deepcopy(renderings["overlays/multi-node"].objects)
    policy = next(o for o in objects if o["kind"] == "NetworkPolicy")
    job = next(o for o in objects if o["kind"] == "RayJob")
    policy["spec"]["ingress"].append({"from": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]})
    policy["spec"]["ingress"][1].pop("ports")
    job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["metadata"]["labels"].clear()
    text = "\n".join(network_policy_problems(objects))
    assert "admits more than labelled pods" in text
    assert "submitter: a submitter must be admitted on TCP 8265 only" in text
    assert "group gpu-train: not covered by the NetworkPolicy" in text


def test_every_secret_the_manifests_read_is_created_in_the_docs(renderings: dict) -> None:
    docs = (REPO_ROOT / "docs" / "CLUSTER.md").read_text()
    refs = set()
    for rendering in renderings.values():
        for obj in ray_objects(rendering.objects):
            text = str(obj)
            refs |= set(re.findall(r"'secretKeyRef': \{'name': '([^']+)', 'key': '([^']+)'\}", text))
    assert refs == {("longcat-ray-auth", "auth_token")}
    for name, key in refs:
        assert re.search(rf"kubectl create secret generic {name} \\?\s*--from-literal={key}=", docs), name


TRAINING = [n for n in KUSTOMIZATIONS if not n.endswith("shards")]  # shard builds run no collectives


@pytest.mark.parametrize("name", TRAINING)
def test_gpu_pods_carry_the_collective_env_and_placement_placeholders(renderings: dict, name: str) -> None:
    objects = ray_objects(renderings[name].objects)
    assert any(gpus(template) for obj in objects for _, template in pod_templates(obj))
    assert [p for obj in objects for p in gpu_placement_problems(obj)] == []


def test_gpu_placement_check_catches_missing_env_and_placeholders(renderings: dict) -> None:
    job = _job(renderings)
    worker = _worker(job)
    worker["env"] = [e for e in worker["env"] if e["name"] != "GLOO_SOCKET_IFNAME"]
    next(e for e in worker["env"] if e["name"] == "NCCL_NVLS_ENABLE")["value"] = "1"
    template = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]
    template["spec"].pop("tolerations")
    text = "\n".join(gpu_placement_problems(job))
    assert "needs GLOO_SOCKET_IFNAME set, has None" in text
    assert "needs NCCL_NVLS_ENABLE = '0', has '1'" in text
    assert "without a toleration of the nvidia.com/gpu taint" in text


def test_the_submit_runtime_env_uploads_code_only_and_holds_no_credentials() -> None:
    import yaml

    from longcat_dist.config import TrainConfig

    runtime_env = yaml.safe_load((REPO_ROOT / "launch" / "runtime_env.yaml").read_text())
    excludes = set(runtime_env["excludes"])
    default_output = f"{TrainConfig.__dataclass_fields__['output_dir'].default}/"
    for needed in (".git/", ".venv/", "data/", "demo_output/", default_output, "*.safetensors", "*.tar"):
        assert needed in excludes, f"launch/runtime_env.yaml uploads {needed}"
    assert "working_dir" not in runtime_env, "the working dir comes from `ray job submit --working-dir .`"
    assert runtime_env_problems(runtime_env, "launch/runtime_env.yaml") == []
    leaked = {**runtime_env, "env_vars": {**runtime_env["env_vars"], "AWS_SECRET_ACCESS_KEY": "abc"}}
    assert len(runtime_env_problems(leaked, "launch/runtime_env.yaml")) == 1
