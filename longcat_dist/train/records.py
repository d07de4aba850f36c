"""`<output_dir>/workers/rank-N.json`: where each rank ran (node, address, process), where it started and what it
ended with (the sha256 of its final LoRA, equal on every rank when the data-parallel steps agreed)."""

from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path
from typing import Any

from torch import nn

from longcat_dist.model import lora

WORKERS_DIR = "workers"


def lora_digest(model: nn.Module) -> str:
    """sha256 of this rank's full LoRA weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(lora.lora_state_dict(model).items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def record_worker(output_dir: str | Path, rank: int, world_size: int, **fields: Any) -> None:
    """Merge `fields` and this process's node, address and pid into rank-N.json (atomically)."""
    import ray

    path = Path(output_dir) / WORKERS_DIR / f"rank-{rank}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    record = json.loads(path.read_text()) if path.is_file() else {}
    record.update(rank=rank, world_size=world_size, node_id=ray.get_runtime_context().get_node_id(),
                  node_ip=ray.util.get_node_ip_address(), hostname=socket.gethostname(), pid=os.getpid(),
                  **fields)  # fmt: skip
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(path)


def read_worker_records(output_dir: str | Path) -> list[dict]:
    """Every rank's record, by rank."""
    paths = Path(output_dir).joinpath(WORKERS_DIR).glob("rank-*.json")
    records = [json.loads(p.read_text()) for p in paths]
    return sorted(records, key=lambda r: r["rank"])
