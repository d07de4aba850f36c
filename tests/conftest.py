"""Session-wide test settings: quiet, deterministic, CPU-only."""

import os

import pytest

# Keep every library on the CPU path and quiet; tests that need more set it themselves.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def gloo_process_group():
    """One single-process gloo group for the in-process DeepSpeed engines of the whole session.

    Created once and destroyed at the end: DeepSpeed caches its groups, so an engine built after a
    destroy/re-init would hold groups of the dead one.
    """
    import socket

    import torch.distributed as dist

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
                "LOCAL_RANK": "0"}  # fmt: skip
    saved = {key: os.environ.get(key) for key in settings}
    os.environ.update(settings)
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
