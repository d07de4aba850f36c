"""`ray job submit` against a local head started by the test: a short training job must reach SUCCEEDED."""

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the ray CLI of this environment


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_helpers():
    spec = importlib.util.spec_from_file_location(
        "train_helpers_for_launch", REPO / "tests/train/train_helpers.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def ray_head(monkeypatch):
    """`ray start --head --block` on free ports in its own session; ended by its process group id afterwards."""
    port, dashboard = _free_port(), _free_port()
    temp_dir = Path("/tmp") / f"rj{os.getpid()}"  # short: Ray's unix socket paths must stay under 107 chars
    # A throwaway head on 127.0.0.1: token auth off, so the CLI and the client need no token file.
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("RAY_ADDRESS", "")
    # The job's `python` is the head's: this environment's, as on a cluster it is the image's.
    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", "--num-cpus=2", "--include-dashboard=true",
         f"--dashboard-port={dashboard}", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    address = f"http://127.0.0.1:{dashboard}"
    try:
        _wait_for_dashboard(address, head)
        yield address
    finally:
        os.killpg(
            head.pid, signal.SIGTERM
        )  # our own session only: never `ray stop`, which ends every Ray here
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_for_dashboard(address: str, head: subprocess.Popen, timeout_s: float = 120.0) -> None:
    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"ray start exited with {head.returncode}")
        try:
            JobSubmissionClient(address).list_jobs()
            return
        except Exception:  # the job server is not up yet
            time.sleep(2)
    raise TimeoutError(f"Ray job server at {address} did not start in {timeout_s} s")


def test_ray_job_submit_runs_training_to_succeeded(ray_head, tmp_path):
    helpers = _train_helpers()
    shards = tmp_path / "shards"
    helpers.write_shards(shards, "tiny", {(5, 16, 16): [2, 2]}, text_dim=helpers.TINY_TEXT_DIM)
    helpers.make_config(tmp_path, shards, num_workers=1, max_train_steps=2, checkpointing_steps=2)
    submit = [str(BIN / "ray"), "job", "submit", "--address", ray_head, "--submission-id", "longcat-test",
              "--working-dir", str(REPO), "--runtime-env", str(REPO / "launch/runtime_env.yaml"), "--",
              "python", "-m", "launch.train", "--config", str(tmp_path / "config.json")]  # fmt: skip
    run = subprocess.run(
        submit, capture_output=True, text=True, timeout=420, env={**os.environ, "RAY_ADDRESS": ""}
    )
    from ray.job_submission import JobStatus, JobSubmissionClient

    status = JobSubmissionClient(ray_head).get_job_status("longcat-test")
    assert status == JobStatus.SUCCEEDED, run.stdout[-3000:] + run.stderr[-3000:]
    assert "training finished" in run.stdout
    assert (tmp_path / "out" / "lora.safetensors").is_file()
    assert (tmp_path / "ray" / "t" / "checkpoint-0000002" / "train_state.json").is_file()
