"""Multi-node on one machine: a Ray head and a second Ray node as separate processes, the demo-style training
submitted with `ray job submit`, workers spread over both nodes, DeepSpeed (gloo) across them.

When the test runs as root with `ip netns`, the second node lives in its own Linux network namespace joined to the
head by a veth pair, so the two nodes talk over a real (virtual) network link; otherwise both nodes share the host's
network and the test says so in its output.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
NETNS = "lcdist-node2"
HEAD_IP_NS, NODE_IP_NS = "10.231.7.1", "10.231.7.2"
# The kill test: long enough that the kill lands mid-run, with checkpoints before it.
KILL_RUN_STEPS, KILL_RUN_CHECKPOINT_EVERY = 60, 10

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, check=check)


def _netns_available() -> bool:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return False
    probe = _run("ip", "netns", "add", NETNS + "-probe", check=False)
    if probe.returncode != 0:
        return False
    _run("ip", "netns", "del", NETNS + "-probe", check=False)
    return True


def _setup_netns() -> None:
    _run("ip", "netns", "del", NETNS, check=False)
    _run("ip", "link", "del", "lcdist-veth0", check=False)
    for cmd in (
        ["ip", "netns", "add", NETNS],
        ["ip", "link", "add", "lcdist-veth0", "type", "veth", "peer", "name", "lcdist-veth1"],
        ["ip", "link", "set", "lcdist-veth1", "netns", NETNS],
        ["ip", "addr", "add", f"{HEAD_IP_NS}/24", "dev", "lcdist-veth0"],
        ["ip", "link", "set", "lcdist-veth0", "up"],
        ["ip", "netns", "exec", NETNS, "ip", "addr", "add", f"{NODE_IP_NS}/24", "dev", "lcdist-veth1"],
        ["ip", "netns", "exec", NETNS, "ip", "link", "set", "lcdist-veth1", "up"],
        ["ip", "netns", "exec", NETNS, "ip", "link", "set", "lo", "up"],
    ):
        _run(*cmd)


def _teardown_netns() -> None:
    _run("ip", "link", "del", "lcdist-veth0", check=False)
    _run("ip", "netns", "del", NETNS, check=False)


class TwoNodeCluster:
    """A Ray head plus one worker node, each a `ray start --block` process group we own (never `ray stop`)."""

    def __init__(self, tmp: Path, isolated: bool):
        self.tmp, self.isolated = tmp, isolated
        self.head_ip = HEAD_IP_NS if isolated else "127.0.0.1"
        self.node_ip = NODE_IP_NS if isolated else "127.0.0.1"
        self.gcs_port, self.dashboard_port = _free_port(), _free_port()
        # Short: Ray's unix socket paths must stay under 107 characters.
        self.temp_dir = Path("/tmp") / f"mn{os.getpid()}"
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled", "DS_ACCELERATOR": "cpu",
                    "RAY_USAGE_STATS_ENABLED": "0", "PATH": f"{BIN}:{os.environ['PATH']}"}  # fmt: skip
        self.procs: dict[str, subprocess.Popen] = {}

    def _start(self, name: str, args: list[str], netns: bool, interface: str) -> None:
        prefix = ["ip", "netns", "exec", NETNS] if netns else []
        log = open(self.tmp / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        # gloo advertises the address of this interface to the other ranks (the hostname would resolve to
        # 127.0.0.1, which the other namespace cannot reach): the multi-node setting docs/CLUSTER.md describes.
        env = {**self.env, "GLOO_SOCKET_IFNAME": interface}
        self.procs[name] = subprocess.Popen(
            [*prefix, str(BIN / "ray"), "start", "--block", *args],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip

    def start_head(self) -> None:
        self._start("head", ["--head", f"--node-ip-address={self.head_ip}", f"--port={self.gcs_port}",
                             "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                             "--num-cpus=2", '--resources={"head_node": 1}', "--include-dashboard=true",
                             f"--temp-dir={self.temp_dir}", "--disable-usage-stats"],
                    netns=False, interface="lcdist-veth0" if self.isolated else "lo")  # fmt: skip

    def start_node(self) -> None:
        self._start("node2", [f"--address={self.head_ip}:{self.gcs_port}", f"--node-ip-address={self.node_ip}",
                              "--num-cpus=2", '--resources={"worker_node": 1}',
                              # Its own session directory: two nodes on one filesystem must not share the folders
                              # where each node unpacks the job's working_dir (one would delete the other's).
                              f"--temp-dir={self.temp_dir}n", "--disable-usage-stats"],
                    netns=self.isolated, interface="lcdist-veth1" if self.isolated else "lo")  # fmt: skip

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name, None)
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)

    def wait_for_nodes(self, count: int, timeout: float = 120.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            out = _run(str(BIN / "ray"), "status", f"--address={self.head_ip}:{self.gcs_port}", check=False)
            if out.returncode == 0 and out.stdout.count("node_") >= count:
                return
            time.sleep(2)
        raise AssertionError(f"Ray cluster did not reach {count} nodes:\n{out.stdout}\n{out.stderr}")

    def submit_async(self, entrypoint: list[str]) -> str:
        """`ray job submit --no-wait`; returns the submission id."""
        job_id = f"multinode-{int(time.time())}"
        _run(str(BIN / "ray"), "job", "submit", f"--address=http://127.0.0.1:{self.dashboard_port}",
             f"--submission-id={job_id}", "--no-wait", f"--working-dir={REPO}",
             f"--runtime-env={REPO / 'launch/runtime_env.yaml'}", "--", *entrypoint)  # fmt: skip
        return job_id

    def wait(self, job_id: str, timeout: float) -> tuple[str, str]:
        """Wait for a job to end; returns (status, logs)."""
        from ray.job_submission import JobSubmissionClient

        client = JobSubmissionClient(f"http://127.0.0.1:{self.dashboard_port}")
        deadline = time.time() + timeout
        while time.time() < deadline and not client.get_job_status(job_id).is_terminal():
            time.sleep(2)
        return str(client.get_job_status(job_id)), client.get_job_logs(job_id)

    def submit(self, entrypoint: list[str], timeout: float) -> tuple[str, str]:
        """`ray job submit` (blocking) from the repository; returns (final status, logs)."""
        address = f"http://127.0.0.1:{self.dashboard_port}"
        job_id = f"multinode-{int(time.time())}"
        proc = subprocess.run(
            [str(BIN / "ray"), "job", "submit", f"--address={address}", f"--submission-id={job_id}",
             f"--working-dir={REPO}", f"--runtime-env={REPO / 'launch/runtime_env.yaml'}", "--", *entrypoint],
            env=self.env, capture_output=True, text=True, timeout=timeout, cwd=REPO,
        )  # fmt: skip
        from ray.job_submission import JobSubmissionClient

        status = JobSubmissionClient(address).get_job_status(job_id)
        return str(status), proc.stdout + proc.stderr


@pytest.fixture
def cluster(tmp_path):
    isolated = _netns_available()
    if isolated:
        _setup_netns()
    if not isolated:
        # Still two Ray nodes in two process trees, but sharing the loopback: say so in the test summary.
        warnings.warn("no network namespaces here (needs root and `ip netns`): both Ray nodes share the host's "
                      "network", stacklevel=1)  # fmt: skip
    nodes = TwoNodeCluster(tmp_path, isolated)
    try:
        nodes.start_head()
        nodes.start_node()
        nodes.wait_for_nodes(2)
        yield nodes
    finally:
        for name in ("node2", "head"):
            nodes.stop(name)
        shutil.rmtree(nodes.temp_dir, ignore_errors=True)
        shutil.rmtree(f"{nodes.temp_dir}n", ignore_errors=True)
        if isolated:
            _teardown_netns()


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory) -> Path:
    """The demo's synthetic clips and shards (few clips), built once for this module; returns multidatabackend.json."""
    from launch.demo import build_demo_shards

    return build_demo_shards(tmp_path_factory.mktemp("demo") / "data", train_clips=8)


def _demo_config(tmp_path: Path, backends: Path, **overrides) -> Path:
    """configs/demo/config.json, short, spread one worker per node, writing under tmp_path."""
    config = json.loads((REPO / "configs" / "demo" / "config.json").read_text())
    config.update(data_backend_config=str(backends), output_dir=str(tmp_path / "out"),
                  storage_path=str(tmp_path / "ray"), experiment_name="t", placement_strategy="STRICT_SPREAD",
                  report_to="none", max_train_steps=4, checkpointing_steps=2, validation_steps=2,
                  validation_num_inference_steps=2, logging_steps=1, lr_warmup_steps=0)  # fmt: skip
    config.update(overrides)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config, indent=2))
    return path


def _workers(tmp_path: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((tmp_path / "out" / "workers").glob("rank-*.json"))]


def test_job_submitted_to_the_head_trains_across_both_nodes(cluster, demo_data, tmp_path):
    config = _demo_config(tmp_path, demo_data)
    status, logs = cluster.submit(
        [sys.executable, "-m", "launch.train", "--config", str(config)], timeout=600
    )
    assert "SUCCEEDED" in status, logs[-4000:]
    workers = _workers(tmp_path)
    assert len(workers) == 2 and len({w["node_id"] for w in workers}) == 2, workers
    if cluster.isolated:
        assert {w["node_ip"] for w in workers} == {cluster.head_ip, cluster.node_ip}
    # gloo all-reduced every step across the nodes, so both ranks hold the same LoRA at the end.
    assert workers[0]["final_lora_sha256"] == workers[1]["final_lora_sha256"]
    checkpoints = sorted(p.name for p in (tmp_path / "ray" / "t").glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-0000002", "checkpoint-0000004"], checkpoints
    assert (tmp_path / "out" / "lora.safetensors").is_file()
    # The validation actor ran beside the workers: base model, step 2 and the final LoRA, with videos.
    validation = tmp_path / "out" / "validation"
    steps = sorted(int(p.parent.name.split("_")[1]) for p in validation.glob("step_*/metrics.json"))
    assert steps == [0, 2, 4], steps
    assert all(list((validation / f"step_{step:07d}").glob("*.mp4")) for step in steps)


def _steps_done(metrics: Path) -> int:
    """The newest step in rank 0's metrics.jsonl (a line being written is skipped)."""
    steps = [0]
    for line in metrics.read_text().splitlines() if metrics.is_file() else []:
        try:
            steps.append(json.loads(line)["step"])
        except (json.JSONDecodeError, KeyError):
            continue
    return max(steps)


def _checkpoint_steps(tmp_path: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in (tmp_path / "ray" / "t").glob("checkpoint-*"))


def test_a_lost_worker_node_comes_back_and_the_job_resumes_from_its_checkpoint(cluster, demo_data, tmp_path):
    total, every = KILL_RUN_STEPS, KILL_RUN_CHECKPOINT_EVERY
    config = _demo_config(
        tmp_path,
        demo_data,
        max_train_steps=total,
        checkpointing_steps=every,
        validation_steps=0,
        train_batch_size=1,
    )
    job_id = cluster.submit_async([sys.executable, "-m", "launch.train", "--config", str(config)])
    metrics = tmp_path / "out" / "metrics.jsonl"
    deadline = time.time() + 300
    while _steps_done(metrics) < 2 * every + 1 and time.time() < deadline:
        time.sleep(0.2)
    killed_at, saved = _steps_done(metrics), _checkpoint_steps(tmp_path)
    assert 2 * every < killed_at < total, f"training reached step {killed_at} before the kill"
    cluster.stop("node2")  # the whole second node: its raylet and the rank-1 worker die
    time.sleep(5)
    cluster.start_node()  # the node comes back; Ray Train restarts the worker group over both nodes
    status, logs = cluster.wait(job_id, timeout=600)
    assert "SUCCEEDED" in status, logs[-4000:]
    workers = _workers(tmp_path)
    assert len({w["node_id"] for w in workers}) == 2, workers
    # The restarted group began at a checkpoint of the killed run, not at step 0.
    for worker in workers:
        # A checkpoint counts once every rank has reported it to Ray Train, so the newest one on disk when the
        # node died may not have been registered yet: the restart takes that one or the one before it.
        assert max(saved) - every <= worker["start_step"] <= killed_at, (killed_at, saved, workers)
        assert worker["start_step"] > 0 and worker["start_step"] % every == 0, (killed_at, saved, workers)
        assert worker["final_step"] == total
    assert workers[0]["final_lora_sha256"] == workers[1]["final_lora_sha256"]
