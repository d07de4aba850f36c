"""`python -m launch.train`: problems the driver can see end the command at once, before Ray or any worker starts."""

import importlib.util
from pathlib import Path

import pytest

from launch import train

REPO = Path(__file__).resolve().parents[2]


def _train_helpers():
    spec = importlib.util.spec_from_file_location("train_helpers_cli", REPO / "tests/train/train_helpers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fail_if_ray_starts(*args, **kwargs):
    raise AssertionError("ray.init was called for a job that cannot run")


def test_too_few_samples_for_the_ranks_fail_before_ray_starts(tmp_path, monkeypatch, capsys):
    import ray

    helpers = _train_helpers()
    helpers.write_shards(tmp_path / "shards", "tiny", {(5, 16, 16): [1, 1]}, text_dim=helpers.TINY_TEXT_DIM)
    helpers.make_config(tmp_path, tmp_path / "shards", num_workers=2, train_batch_size=2)
    monkeypatch.setattr(ray, "init", _fail_if_ray_starts)
    assert train.main(["--config", str(tmp_path / "config.json")]) == 2
    message = capsys.readouterr().err
    assert "2 samples" in message and "2 rank(s)" in message and "batch of 2" in message, message


def test_a_config_error_names_the_key_and_exits_2(tmp_path, monkeypatch, capsys):
    import ray

    helpers = _train_helpers()
    helpers.write_shards(tmp_path / "shards", "tiny", {(5, 16, 16): [2]}, text_dim=helpers.TINY_TEXT_DIM)
    helpers.make_config(tmp_path, tmp_path / "shards")
    monkeypatch.setattr(ray, "init", _fail_if_ray_starts)
    assert train.main(["--config", str(tmp_path / "config.json"), "--set", "num_frames=8"]) == 2
    assert "num_frames" in capsys.readouterr().err


def test_shards_the_driver_cannot_read_are_left_to_the_workers(tmp_path, caplog):
    helpers = _train_helpers()
    cfg = helpers.make_config(tmp_path, tmp_path / "only-on-the-workers")
    with caplog.at_level("WARNING", logger="launch.train"):
        train.check_data_plan(cfg)
    assert "the driver cannot read the shards" in caplog.text


@pytest.mark.parametrize("workers", [1, 2])
def test_enough_samples_pass_the_check(tmp_path, workers):
    helpers = _train_helpers()
    helpers.write_shards(tmp_path / "shards", "tiny", {(5, 16, 16): [2, 2]}, text_dim=helpers.TINY_TEXT_DIM)
    train.check_data_plan(helpers.make_config(tmp_path, tmp_path / "shards", num_workers=workers))


@pytest.mark.integration
def test_a_nonfinite_streak_ends_the_command_with_exit_2(tmp_path):
    # The real command on a local Ray (its own process, so Ray goes with it): NaN latents in every sample.
    import subprocess
    import sys

    helpers = _train_helpers()
    helpers.write_shards(tmp_path / "shards", "tiny", {(5, 16, 16): [2, 2]}, text_dim=helpers.TINY_TEXT_DIM)
    helpers.poison_shards(tmp_path / "shards")
    helpers.make_config(tmp_path, tmp_path / "shards", max_nonfinite_steps_in_row=2, max_failures=2)
    proc = subprocess.run(
        [sys.executable, "-m", "launch.train", "--config", str(tmp_path / "config.json")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "error: training stopped:" in proc.stderr and "max_nonfinite_steps_in_row = 2" in proc.stderr
    assert "training finished" not in proc.stdout


def test_gpu_workers_get_expandable_segments_unless_the_job_sets_its_own(monkeypatch):
    from launch.train import DEFAULT_CUDA_ALLOC_CONF, worker_env

    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    assert worker_env(True) == {"PYTORCH_CUDA_ALLOC_CONF": DEFAULT_CUDA_ALLOC_CONF}
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:512")
    assert worker_env(True) == {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:512"}
    assert worker_env(False) == {"DS_ACCELERATOR": "cpu"}
