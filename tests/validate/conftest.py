"""Fixtures of the validation tests."""

import pytest
from validate_helpers import random_eval_set, write_config

from longcat_dist.config import load_config


@pytest.fixture
def eval_config(tmp_path):
    """A loaded config whose eval split holds two random clips; output under tmp_path/out."""
    path = write_config(tmp_path)
    random_eval_set(tmp_path)
    return load_config(path)
