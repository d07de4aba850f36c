"""Shared pieces of the training tests: one local Ray instance per session and tiny shard roots."""

import os
from pathlib import Path

import pytest
from train_helpers import TINY_TEXT_DIM, write_shards


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    """12 samples of one bucket ([16, 2, 2, 2] latents) in 3 shards, text dim 32."""
    root = tmp_path_factory.mktemp("tiny_shards")
    write_shards(root, "tiny", {(5, 16, 16): [5, 4, 3]}, text_dim=TINY_TEXT_DIM)
    return root


@pytest.fixture(scope="session")
def pair_shards(tmp_path_factory) -> Path:
    """Two shards of one sample each: every epoch is one step of both samples, whatever the rank layout."""
    root = tmp_path_factory.mktemp("pair_shards")
    write_shards(root, "tiny", {(5, 16, 16): [1, 1]}, text_dim=TINY_TEXT_DIM)
    return root


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray instance per test module, shut down after it (other test folders start their own)."""
    import ray

    from launch.train import JOB_NAMESPACE

    os.environ["DS_ACCELERATOR"] = "cpu"
    ray.init(num_cpus=4, namespace=JOB_NAMESPACE, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def zero2_run(local_ray, tiny_shards, tmp_path_factory):
    """The reference run: 2 workers, ZeRO-2, batch 1, 4 steps, checkpoints at 2 and 4, TensorBoard logs in tb/;
    returns (tmp dir, result)."""
    from train_helpers import make_config

    from launch.train import run_training

    tmp = tmp_path_factory.mktemp("zero2_run")
    result = run_training(make_config(tmp, tiny_shards, report_to="tensorboard", logging_dir=str(tmp / "tb")))
    return tmp, result
