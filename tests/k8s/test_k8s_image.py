"""Structural lint of the Dockerfile and .dockerignore (no Docker engine runs here), and the image's pins."""

from __future__ import annotations

import fnmatch
import re
import shlex

import pytest
from k8s_paths import K8S, REPO_ROOT
from packaging.requirements import Requirement
from packaging.version import Version

# What the image must contain for the manifests' entrypoints and for `pip install -e /app`.
NEEDED = (
    "pyproject.toml", "README.md", "longcat_dist/config.py", "launch/__init__.py", "sharding/__init__.py",
    "configs/cluster/config.json", "configs/cluster/multidatabackend.json", "k8s/image/constraints.txt",
)  # fmt: skip
# What must never be sent to the build: history, local environments, outputs, credentials.
KEPT_OUT = (
    ".git/config",
    ".venv/bin/python",
    ".whl/activate.sh",
    "outputs/run/ckpt",
    "tests/conftest.py",
    "x/.env",
)


def parse_dockerfile(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with comments dropped and continuation lines joined."""
    joined = re.sub(
        r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    )
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip())
        for line in joined.splitlines()
        if line.strip()
    ]


def dockerfile_problems(text: str) -> list[str]:
    """Pinned bases, a non-root final user, the package installed from /app, its venv on PATH."""
    steps = parse_dockerfile(text)
    problems = []
    for instruction, args in steps:
        image = args.split()[0] if instruction == "FROM" else ""
        if instruction == "FROM" and (
            "@sha256:" not in image and (":" not in image.split("/")[-1] or image.endswith(":latest"))
        ):
            problems.append(f"FROM {image}: pin the base image by tag or digest (not latest)")
    users = [args for instruction, args in steps if instruction == "USER"]
    if not users or users[-1].split(":")[0] in ("root", "0"):
        problems.append("the final USER must be a non-root user")
    runs = " ".join(args for instruction, args in steps if instruction == "RUN")
    if (
        not re.search(r"pip install .*-e /app\b", runs)
        or ("COPY", ". /app") not in steps
        or ("WORKDIR", "/app") not in steps
    ):
        problems.append("the repository must be copied to /app and installed with `pip install -e /app`")
    env = " ".join(args for instruction, args in steps if instruction == "ENV")
    venv = re.search(r"VIRTUAL_ENV=(\S+)", env)
    if not venv or f"PATH={venv.group(1)}/bin:" not in env or "ray --version" not in runs:
        problems.append(
            "the venv's bin (with the `ray` CLI) must lead PATH, and the build must run `ray --version`"
        )
    return problems


def test_dockerfile_is_pinned_non_root_and_installs_the_package() -> None:
    assert dockerfile_problems((REPO_ROOT / "Dockerfile").read_text()) == []


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("FROM nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04", "FROM nvidia/cuda"), "pin the base image"),
        (
            ("FROM nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04", "FROM nvidia/cuda:latest"),
            "pin the base image",
        ),
        (("USER 1000:1000", "USER root"), "non-root user"),
        (("USER 1000:1000", ""), "non-root user"),
        (("-e /app", "/app"), "pip install -e /app"),
        (("PATH=/opt/venv/bin:$PATH", "PATH=$PATH"), "lead PATH"),
    ],
)
def test_dockerfile_lint_catches_mistakes(change: tuple[str, str], message: str) -> None:
    text = (REPO_ROOT / "Dockerfile").read_text()
    assert change[0] in text
    assert any(message in problem for problem in dockerfile_problems(text.replace(change[0], change[1])))


def test_dockerfile_copies_only_files_of_the_repository() -> None:
    for instruction, args in parse_dockerfile((REPO_ROOT / "Dockerfile").read_text()):
        if instruction == "COPY":
            source = shlex.split(args)[0]
            assert (REPO_ROOT / source).exists() and not ignored(source), source


def ignored(path: str) -> bool:
    """Whether .dockerignore leaves `path` out of the build context (last matching pattern wins)."""
    result = False
    for raw in (REPO_ROOT / ".dockerignore").read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negated, pattern = pattern.startswith("!"), pattern.lstrip("!")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        deep = pattern.removeprefix("**/")
        if any(fnmatch.fnmatchcase(p, pattern) for p in prefixes) or (
            pattern.startswith("**/") and any(fnmatch.fnmatchcase(part, deep) for part in parts)
        ):
            result = not negated
    return result


def test_dockerignore_keeps_what_the_image_needs_and_drops_the_rest() -> None:
    assert [path for path in NEEDED if ignored(path)] == []
    assert [path for path in KEPT_OUT if not ignored(path)] == []


def _requirements() -> dict[str, Requirement]:
    """The dependencies declared in pyproject.toml, by name."""
    text = (REPO_ROOT / "pyproject.toml").read_text()
    block = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M).group(1)
    return {req.name: req for req in map(Requirement, re.findall(r'"([^"]+)"', block))}


def test_image_pins_satisfy_the_package_requirements() -> None:
    requirements = _requirements()
    lines = (K8S / "image" / "constraints.txt").read_text().splitlines()
    pins = dict(line.split("==") for line in lines if line and not line.startswith("#"))
    assert {"ray", "deepspeed"} <= set(pins)
    for name, version in pins.items():
        assert name in requirements, f"{name} is pinned but not a dependency"
        assert requirements[name].specifier.contains(Version(version)), f"{name}=={version}"
    torch = re.search(r"ARG TORCH_VERSION=(\S+)", (REPO_ROOT / "Dockerfile").read_text()).group(1)
    assert requirements["torch"].specifier.contains(Version(torch)), torch
