"""Fixtures of the validation tests."""

import sys

import pytest
from validate_helpers import random_clips, write_config

from longcat_dist.config import load_config


@pytest.fixture
def eval_config(tmp_path):
    """A loaded config whose eval split holds two random clips; output under tmp_path/out."""
    path = write_config(tmp_path)
    random_clips(tmp_path)
    return load_config(path)


@pytest.fixture(scope="module", autouse=True)
def ray_shut_down_after_module(request):
    """Fail the module that leaves Ray initialized, so that the next module's ray.init does not fail instead."""
    yield
    ray = sys.modules.get("ray")  # never imported: never started
    if ray is not None and ray.is_initialized():
        ray.shutdown()
        pytest.fail(
            f"{request.module.__name__} left Ray initialized; shut it down in the fixture that started it "
            "(validate_helpers.local_ray does)"
        )
