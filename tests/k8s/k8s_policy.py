"""Policy checks on rendered manifests: security, KubeRay's own admission rules, pod wiring.

Each check returns a list of problems (one line each, naming the object and the rule), so that tests can
assert that the real manifests have none and that a deliberately broken copy is caught.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import yaml
from k8s_schemas import pod_templates

RAY_KINDS = ("RayJob", "RayCluster")
# Env names that hold credentials: such a variable must come from a Secret, never a literal.
SECRET_NAME = re.compile(r"TOKEN(?!IZER)|SECRET|PASSW|CREDENTIAL|PRIVATE|API_?KEY|ACCESS_?KEY", re.IGNORECASE)
# Values that look like credentials whatever the variable's name.
SECRET_VALUE = re.compile(
    r"AKIA[0-9A-Z]{16}|-----BEGIN [A-Z ]*PRIVATE KEY|gh[pousr]_[A-Za-z0-9]{20,}|xox[abp]-|hf_[A-Za-z0-9]{20,}"
    r"|://[^/\s:@]+:[^/\s@]+@|eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}"
)
# KubeRay appends a suffix to a RayJob's name for its cluster, hence the shorter limit (utils/constant.go).
MAX_NAME = {"RayJob": 47, "RayCluster": 53}
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
MIN_TOKEN_AUTH_RAY = (2, 52, 0)


def ray_objects(objects: list[dict]) -> list[dict]:
    """The RayJobs and RayClusters among rendered objects."""
    return [obj for obj in objects if obj.get("kind") in RAY_KINDS]


def cluster_spec(obj: dict) -> dict:
    """The RayClusterSpec of a RayJob or RayCluster."""
    return obj["spec"]["rayClusterSpec"] if obj["kind"] == "RayJob" else obj["spec"]


def containers(template: dict) -> list[dict]:
    """Init and main containers of a pod template."""
    spec = template.get("spec", {})
    return spec.get("initContainers", []) + spec.get("containers", [])


def _env(container: dict) -> dict[str, dict]:
    """The env entries of a container (or of autoscalerOptions) by name."""
    return {entry["name"]: entry for entry in container.get("env", [])}


def _auth_problems(where: str, env: dict[str, dict], secret: str | None) -> list[str]:
    """RAY_AUTH_MODE=token literal and RAY_AUTH_TOKEN from a secretKeyRef (to `secret` when given)."""
    problems = []
    if env.get("RAY_AUTH_MODE", {}).get("value") != "token":
        problems.append(f"{where}: RAY_AUTH_MODE must be 'token'")
    ref = env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef")
    if not ref or "value" in env.get("RAY_AUTH_TOKEN", {}):
        problems.append(f"{where}: RAY_AUTH_TOKEN must come from a secretKeyRef, not a literal")
    elif secret is not None and ref.get("name") != secret:
        problems.append(
            f"{where}: RAY_AUTH_TOKEN reads Secret '{ref.get('name')}', authOptions names '{secret}'"
        )
    return problems


def auth_problems(obj: dict) -> list[str]:
    """Token auth on: authOptions, and the token env on every Ray, submitter and autoscaler container."""
    spec = cluster_spec(obj)
    options = spec.get("authOptions", {})
    problems = []
    if options.get("mode") != "token" or not options.get("secretName"):
        problems.append(
            f"{obj['kind']}/{obj['metadata']['name']}: authOptions must be mode token with secretName"
        )
    secret = options.get("secretName")
    for where, template in pod_templates(obj):
        for container in template["spec"]["containers"]:
            problems += _auth_problems(f"{where} {container['name']}", _env(container), secret)
    if spec.get("enableInTreeAutoscaling"):
        autoscaler_env = _env(spec.get("autoscalerOptions", {}))
        problems += _auth_problems(f"{obj['metadata']['name']} autoscaler", autoscaler_env, secret)
    return problems


def exposure_problems(objects: list[dict]) -> list[str]:
    """No LoadBalancer / NodePort Service, no Ingress, Ray heads on ClusterIP only."""
    problems = []
    for obj in objects:
        name = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
        if obj.get("kind") == "Service" and obj.get("spec", {}).get("type", "ClusterIP") != "ClusterIP":
            problems.append(f"{name}: Service type {obj['spec']['type']} exposes Ray; use ClusterIP")
        if obj.get("kind") == "Ingress":
            problems.append(f"{name}: an Ingress would expose the dashboard / job API")
        if obj.get("kind") in RAY_KINDS:
            head = cluster_spec(obj)["headGroupSpec"]
            service_type = head.get("headService", {}).get("spec", {}).get("type", head.get("serviceType"))
            if service_type != "ClusterIP":
                problems.append(
                    f"{name}: head service type {service_type!r}; it must be ClusterIP, set explicitly"
                )
            if head.get("enableIngress"):
                problems.append(f"{name}: enableIngress exposes the dashboard / job API")
    return problems


def _container_security(where: str, context: dict, mounts: set[str]) -> list[str]:
    """Non-root, no privilege escalation, all capabilities dropped, read-only root with a writable /tmp."""
    problems = []
    if context.get("allowPrivilegeEscalation") is not False:
        problems.append(f"{where}: allowPrivilegeEscalation must be false")
    capabilities = context.get("capabilities", {})
    if "ALL" not in capabilities.get("drop", []) or capabilities.get("add"):
        problems.append(f"{where}: capabilities must drop ALL and add none")
    if context.get("privileged"):
        problems.append(f"{where}: privileged")
    if context.get("runAsNonRoot") is not True or context.get("runAsUser", 1) == 0:
        problems.append(f"{where}: runAsNonRoot must be true (and runAsUser not 0)")
    if context.get("readOnlyRootFilesystem") is not True:
        problems.append(f"{where}: readOnlyRootFilesystem must be true")
    elif "/tmp" not in mounts:
        problems.append(f"{where}: a read-only root needs a writable /tmp mount (Ray writes /tmp/ray)")
    return problems


def pod_security_problems(obj: dict) -> list[str]:
    """Pod and container security contexts of every pod template (and the autoscaler sidecar)."""
    problems = []
    autoscaling = bool(cluster_spec(obj).get("enableInTreeAutoscaling"))
    for where, template in pod_templates(obj):
        spec = template["spec"]
        pod_context = spec.get("securityContext", {})
        if (
            pod_context.get("runAsNonRoot") is not True
            or not pod_context.get("runAsUser")
            or "fsGroup" not in pod_context
        ):
            problems.append(
                f"{where}: pod securityContext needs runAsNonRoot, a non-zero runAsUser and fsGroup"
            )
        if any(spec.get(key) for key in ("hostNetwork", "hostPID", "hostIPC")):
            problems.append(f"{where}: host namespaces are not allowed")
        if any("hostPath" in volume for volume in spec.get("volumes", [])):
            problems.append(f"{where}: hostPath volumes are not allowed")
        # Only the autoscaling head calls the Kubernetes API; every other pod runs without its token.
        needs_token = autoscaling and where.endswith(" head")
        if spec.get("automountServiceAccountToken") is not needs_token:
            problems.append(f"{where}: automountServiceAccountToken must be {str(needs_token).lower()}")
        for container in containers(template):
            merged = {**pod_context, **container.get("securityContext", {})}
            mounts = {mount["mountPath"] for mount in container.get("volumeMounts", [])}
            problems += _container_security(f"{where} {container['name']}", merged, mounts)
    if autoscaling:
        options = cluster_spec(obj).get("autoscalerOptions", {})
        head_context = cluster_spec(obj)["headGroupSpec"]["template"]["spec"].get("securityContext", {})
        mounts = {mount["mountPath"] for mount in options.get("volumeMounts", [])}
        merged = {**head_context, **options.get("securityContext", {})}
        problems += _container_security(f"{obj['metadata']['name']} autoscaler", merged, mounts)
    return problems


def resource_problems(obj: dict) -> list[str]:
    """Every container requests exactly its limits (GPUs above all) and has CPU and memory limits."""
    problems = []
    for where, template in pod_templates(obj):
        for container in containers(template):
            resources = container.get("resources", {})
            requests, limits = resources.get("requests", {}), resources.get("limits", {})
            here = f"{where} {container['name']}"
            for name in sorted(set(requests) | set(limits)):
                if str(requests.get(name)) != str(limits.get(name)):
                    problems.append(
                        f"{here}: {name} request {requests.get(name)} != limit {limits.get(name)}"
                    )
            if not {"cpu", "memory"} <= set(limits):
                problems.append(f"{here}: cpu and memory limits are required on a shared cluster")
    return problems


def gpus(template: dict) -> int:
    """GPUs a pod template asks for (limits of all its main containers)."""
    return sum(
        int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
        for c in template["spec"]["containers"]
    )


def _env_literals(obj: dict) -> Iterator[tuple[str, str, Any]]:
    """(where, name, literal value) of every env entry with a literal value, autoscaler included."""
    for where, template in pod_templates(obj):
        for container in containers(template):
            for entry in container.get("env", []):
                if "value" in entry:
                    yield f"{where} {container['name']}", entry["name"], entry["value"]
    for entry in cluster_spec(obj).get("autoscalerOptions", {}).get("env", []):
        if "value" in entry:
            yield f"{obj['metadata']['name']} autoscaler", entry["name"], entry["value"]


def _scalars(node: Any, path: str) -> Iterator[tuple[str, str, Any]]:
    """(path, key, value) of every scalar inside a parsed YAML tree."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        if isinstance(value, (dict, list)):
            yield from _scalars(value, f"{path}.{key}")
        else:
            yield path, str(key), value


def secret_literal_problems(obj: dict) -> list[str]:
    """No credential in an env literal or in runtimeEnvYAML: Ray logs runtime_env and env is readable."""
    found = list(_env_literals(obj))
    runtime_env = obj.get("spec", {}).get("runtimeEnvYAML")
    if runtime_env is not None:
        found += list(_scalars(yaml.safe_load(runtime_env), f"{obj['metadata']['name']} runtimeEnvYAML"))
    problems = []
    for where, name, value in found:
        if SECRET_NAME.search(name):
            problems.append(f"{where}: {name} looks like a credential; read it from a Secret (secretKeyRef)")
        elif SECRET_VALUE.search(str(value)):
            problems.append(f"{where}: the value of {name} looks like a credential")
    return problems


def runtime_env_problems(runtime_env: dict, where: str) -> list[str]:
    """A runtime env as YAML data: no credential in it (Ray logs it), like the manifests' runtimeEnvYAML."""
    problems = []
    for path, name, value in _scalars(runtime_env, where):
        if SECRET_NAME.search(name):
            problems.append(f"{path}: {name} looks like a credential; give it through the nodes' environment")
        elif SECRET_VALUE.search(str(value)):
            problems.append(f"{path}: the value of {name} looks like a credential")
    return problems


# What every GPU pod of a training cluster sets: collectives over the pod network, NVLink multicast off.
GPU_ENV = {"NCCL_SOCKET_IFNAME": None, "GLOO_SOCKET_IFNAME": None, "NCCL_NVLS_ENABLE": "0"}


def gpu_placement_problems(obj: dict) -> list[str]:
    """GPU pods carry the NCCL/gloo environment and the nodeSelector + toleration placeholders of a shared cluster."""
    problems = []
    for where, template in pod_templates(obj):
        if gpus(template) == 0:
            continue
        spec = template["spec"]
        if not spec.get("nodeSelector"):
            problems.append(f"{where}: a GPU pod without a nodeSelector (placeholder for the GPU nodes' label)")
        if not any(t.get("key") == "nvidia.com/gpu" for t in spec.get("tolerations", [])):
            problems.append(f"{where}: a GPU pod without a toleration of the nvidia.com/gpu taint")
        if where.endswith("gpu-validate"):
            continue  # the validation actor samples on its GPU alone: no collectives
        for container in spec["containers"]:
            env = _env(container)
            for name, wanted in GPU_ENV.items():
                value = env.get(name, {}).get("value")
                if value is None or (wanted is not None and value != wanted):
                    expected = f"= {wanted!r}" if wanted is not None else "set"
                    problems.append(f"{where}: container {container['name']} needs {name} {expected}, has {value!r}")
    return problems


def _version(text: str) -> tuple[int, ...]:
    """'2.60.0' -> (2, 60, 0); non-numeric parts count as 0."""
    return tuple(int(part) if part.isdigit() else 0 for part in text.split("."))


def _group_problems(name: str, group: dict, autoscaling: bool) -> list[str]:
    """One worker group: KubeRay's admission rules and a replica count that it would not clamp."""
    problems = []
    where = f"{name} group {group.get('groupName')}"
    if not group["template"]["spec"].get("containers"):
        problems.append(f"{where}: needs at least one container")
    if group.get("resources") and any(
        group.get("rayStartParams", {}).get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")
    ):
        problems.append(f"{where}: resources set both in rayStartParams and in resources")
    if "labels" in group.get("rayStartParams", {}):
        problems.append(
            f"{where}: rayStartParams['labels'] is refused by KubeRay; use the group's labels field"
        )
    low, high = group.get("minReplicas", 0), group.get("maxReplicas", 2**31 - 1)
    replicas = group.get("replicas", low)
    if not low <= replicas <= high:
        problems.append(
            f"{where}: needs minReplicas <= replicas <= maxReplicas, got {low} <= {replicas} <= {high}"
        )
    if not autoscaling and low != high:
        problems.append(f"{where}: without the autoscaler minReplicas must equal maxReplicas (a fixed size)")
    return problems


def kuberay_problems(obj: dict) -> list[str]:
    """What KubeRay's webhook/controller would refuse (ray-operator/controllers/ray/utils/validation.go)."""
    name = f"{obj['kind']}/{obj['metadata']['name']}"
    spec, cluster = obj["spec"], cluster_spec(obj)
    problems = []
    if len(obj["metadata"]["name"]) > MAX_NAME[obj["kind"]] or not DNS_1035.match(obj["metadata"]["name"]):
        problems.append(
            f"{name}: the name must be a DNS-1035 label of at most {MAX_NAME[obj['kind']]} characters"
        )
    if not cluster["headGroupSpec"]["template"]["spec"].get("containers"):
        problems.append(f"{name}: the head needs at least one container")
    if (
        cluster.get("authOptions", {}).get("mode") == "token"
        and _version(cluster.get("rayVersion", "0")) < MIN_TOKEN_AUTH_RAY
    ):
        problems.append(f"{name}: token auth needs rayVersion >= 2.52.0, got {cluster.get('rayVersion')!r}")
    names = [group.get("groupName") for group in cluster.get("workerGroupSpecs", [])]
    if len(names) != len(set(names)):
        problems.append(f"{name}: worker group names must be unique, got {names}")
    for group in cluster.get("workerGroupSpecs", []):
        problems += _group_problems(name, group, bool(cluster.get("enableInTreeAutoscaling")))
    if obj["kind"] == "RayJob":
        problems += _rayjob_problems(name, spec)
    return problems


def _rayjob_problems(name: str, spec: dict) -> list[str]:
    """A RayJob cleans up after itself and is bounded in time and retries."""
    problems = []
    if spec.get("shutdownAfterJobFinishes") is not True:
        problems.append(f"{name}: shutdownAfterJobFinishes must be true so that the GPUs are given back")
    if not isinstance(spec.get("ttlSecondsAfterFinished"), int) or spec["ttlSecondsAfterFinished"] < 0:
        problems.append(f"{name}: ttlSecondsAfterFinished must be set, >= 0")
    if not isinstance(spec.get("activeDeadlineSeconds"), int) or spec["activeDeadlineSeconds"] <= 0:
        problems.append(f"{name}: activeDeadlineSeconds must be set, > 0")
    if not isinstance(spec.get("backoffLimit"), int) or spec["backoffLimit"] < 0:
        problems.append(f"{name}: backoffLimit must be set, >= 0")
    if "runtimeEnvYAML" in spec:
        try:
            yaml.safe_load(spec["runtimeEnvYAML"])
        except yaml.YAMLError as error:
            problems.append(f"{name}: runtimeEnvYAML is not valid YAML: {error}")
    return problems


def wiring_problems(obj: dict) -> list[str]:
    """Mounts name existing volumes (autoscaler included), and GPU pods get a memory-backed /dev/shm."""
    problems = []
    for where, template in pod_templates(obj):
        volumes = {volume["name"]: volume for volume in template["spec"].get("volumes", [])}
        for container in containers(template):
            for mount in container.get("volumeMounts", []):
                if mount["name"] not in volumes:
                    problems.append(f"{where} {container['name']}: mount of unknown volume '{mount['name']}'")
            shm = [
                volumes.get(m["name"], {})
                for m in container.get("volumeMounts", [])
                if m["mountPath"] == "/dev/shm"
            ]
            if gpus(template) and not (shm and shm[0].get("emptyDir", {}).get("medium") == "Memory"):
                problems.append(f"{where} {container['name']}: a GPU pod needs /dev/shm as a Memory emptyDir")
    if cluster_spec(obj).get("enableInTreeAutoscaling"):
        head_volumes = {
            v["name"] for v in cluster_spec(obj)["headGroupSpec"]["template"]["spec"].get("volumes", [])
        }
        for mount in cluster_spec(obj).get("autoscalerOptions", {}).get("volumeMounts", []):
            if mount["name"] not in head_volumes:
                problems.append(
                    f"{obj['metadata']['name']} autoscaler: mount of unknown head volume '{mount['name']}'"
                )
    return problems


def _selects(selector: dict, labels: dict) -> bool:
    """Whether a matchLabels-only selector selects these labels (matchExpressions are not used here)."""
    return "matchExpressions" not in selector and all(
        labels.get(k) == v for k, v in selector.get("matchLabels", {}).items()
    )


def network_policy_problems(objects: list[dict]) -> list[str]:
    """The policy covers every Ray pod, admits only labelled peers, submitters only on the job API port."""
    policies = [obj for obj in objects if obj.get("kind") == "NetworkPolicy"]
    if len(policies) != 1:
        return [f"expected one NetworkPolicy, found {len(policies)}"]
    spec = policies[0]["spec"]
    problems = []
    if spec.get("policyTypes") != ["Ingress"] or not spec.get("podSelector", {}).get("matchLabels"):
        problems.append("NetworkPolicy: needs policyTypes [Ingress] and a label podSelector")
    for rule in spec.get("ingress", []):
        peers = rule.get("from", [])
        if not peers or any(not peer or "ipBlock" in peer or peer.get("podSelector") == {} for peer in peers):
            problems.append(f"NetworkPolicy: rule {rule} admits more than labelled pods")
    for obj in ray_objects(objects):
        for where, template in pod_templates(obj):
            labels = template.get("metadata", {}).get("labels", {})
            admitted = [
                rule
                for rule in spec.get("ingress", [])
                if any(
                    _selects(p.get("podSelector", {}), labels) and "namespaceSelector" not in p
                    for p in rule.get("from", [])
                )
            ]
            if where.endswith(" submitter"):
                if not admitted or any(
                    rule.get("ports") != [{"protocol": "TCP", "port": 8265}] for rule in admitted
                ):
                    problems.append(f"{where}: a submitter must be admitted on TCP 8265 only")
            elif not _selects(spec["podSelector"], labels) or not any(
                "ports" not in rule for rule in admitted
            ):
                problems.append(
                    f"{where}: not covered by the NetworkPolicy, or not admitted by the other Ray pods"
                )
    return problems
