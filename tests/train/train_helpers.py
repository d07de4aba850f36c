"""Helpers of the training tests: tiny configs over tiny shard roots (imported by tests and conftest)."""

import importlib.util
import json
import math
from pathlib import Path

import torch

TINY_TEXT_DIM = 32  # the tiny DiT's caption_channels


def make_config(tmp_path: Path, shards: Path, **overrides):
    """A TrainConfig for the tiny DiT on CPU over one shard root; overrides are config keys."""
    from longcat_dist.config import load_config

    tmp_path.mkdir(parents=True, exist_ok=True)
    backends = [
        {"id": "tiny", "type": "local", "dataset_type": "video", "instance_data_dir": str(tmp_path / "clips"),
         "caption_strategy": "textfile", "cache_dir_vae": str(shards), "conditioning_data": ["tiny-start"],
         "video": {"num_frames": 5, "min_frames": 5, "is_i2v": True}},
        {"id": "tiny-start", "type": "local", "dataset_type": "conditioning",
         "instance_data_dir": str(tmp_path / "start")},
    ]  # fmt: skip
    (tmp_path / "multidatabackend.json").write_text(json.dumps(backends))
    config = {
        "data_backend_config": "multidatabackend.json", "tiny_model": True, "resolution": 16, "num_frames": 5,
        "use_gpu": False, "num_workers": 2, "cpus_per_worker": 1, "validation_steps": 0, "lora_rank": 4,
        "learning_rate": 1e-3, "train_batch_size": 1, "dataloader_num_workers": 0, "shuffle_buffer": 4,
        "gradient_checkpointing": False, "caption_dropout_probability": 0.1, "max_train_steps": 4,
        "checkpointing_steps": 2, "report_to": "none", "output_dir": str(tmp_path / "out"),
        "storage_path": str(tmp_path / "ray"), "experiment_name": "t", **overrides,
    }  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(config))
    return load_config(tmp_path / "config.json")


def poison_shards(root: Path) -> None:
    """Rewrite every shard of a root with NaN video latents (same samples and counts): every loss is non-finite."""
    import webdataset as wds

    from longcat_dist.data import format as fmt
    from longcat_dist.data import stream

    manifest = stream.read_manifest(root)
    for bucket in manifest.buckets:
        for shard in bucket.shards:
            path = root / shard.path
            samples = [fmt.decode_sample(raw, bucket, manifest.text_dim)
                       for raw in wds.tarfile_samples([{"url": str(path)}])]  # fmt: skip
            with wds.TarWriter(str(path), encoder=False) as sink:
                for s in samples:
                    sink.write(
                        fmt.encode_sample(s.key, torch.full_like(s.video, math.nan), s.cond, s.text, s.meta)
                    )


def read_workers(output_dir: Path) -> list[dict]:
    """The <output_dir>/workers/rank-N.json records, by rank."""
    from longcat_dist.train.records import read_worker_records

    return read_worker_records(output_dir)


def _load_shard_writer():
    # tests/data/conftest.py owns the shard writer; load it by path (conftest modules share one name).
    path = Path(__file__).resolve().parents[1] / "data" / "conftest.py"
    spec = importlib.util.spec_from_file_location("data_shard_writer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.write_shards


write_shards = _load_shard_writer()
