"""Helpers of the validation tests: tiny clip shards (the real shard contract), configs, LoRA files, a local Ray."""

import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import webdataset as wds

from longcat_dist.data import format as fmt
from longcat_dist.model import lora
from longcat_dist.validate.runner import build_base_model, settings_from_config

TEXT_DIM = 32  # the tiny DiT's caption_channels
MAX_LENGTH = 8
FRAMES, SIZE = 5, 32  # latents [16, 2, 4, 4] with the tiny Wan VAE (x4 time, x8 space)
CONFIG = {"tiny_model": True, "use_gpu": False, "validation_num_gpus": 0, "data_backend_config": "backends.json",
          "output_dir": "out", "validation_steps": 2, "validation_using_datasets": True, "eval_dataset_id": "val",
          "validation_resolution": f"{SIZE}x{SIZE}", "validation_num_video_frames": FRAMES,
          "validation_num_inference_steps": 3, "num_frames": FRAMES, "resolution": SIZE, "lora_rank": 2,
          "lora_targets": ["qkv", "proj"]}  # fmt: skip


def _video_dataset(name: str) -> list[dict]:
    return [
        {"id": name, "type": "local", "dataset_type": "video", "instance_data_dir": name, "caption_strategy":
         "textfile", "cache_dir_vae": f"shards/{name}", "video": {"num_frames": FRAMES, "is_i2v": True},
         "conditioning_data": [f"{name}-starts"]},
        {"id": f"{name}-starts", "type": "local", "dataset_type": "conditioning", "instance_data_dir":
         f"{name}_starts", "caption_strategy": "textfile"},
    ]  # fmt: skip


def write_clip_shards(
    root: Path,
    videos: list[torch.Tensor],
    texts: list[torch.Tensor],
    null_text: torch.Tensor | None = None,
    max_length: int = MAX_LENGTH,
    dataset_id: str = "val",
    sources: list[list[str] | None] | None = None,
) -> fmt.Manifest:
    """One bucket, one shard: clip latents [16, T, h, w] with their first frame as cond, plus the null text.

    The text width (the manifest's `dim`) is that of `texts`; the tiny DiT reads TEXT_DIM. `sources` gives each
    sample's meta `sources` ([clip, start frame], as the builder writes it; None: no such key).
    """
    root.mkdir(parents=True, exist_ok=True)
    text_dim = texts[0].shape[-1]
    name = fmt.bucket_name(FRAMES, SIZE, SIZE)
    bucket = fmt.BucketInfo(name, FRAMES, SIZE, SIZE, fmt.latent_shape(FRAMES, SIZE, SIZE))
    rel = fmt.shard_relpath(dataset_id, name, 0)
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(root / rel), encoder=False) as sink:
        for index, (video, text) in enumerate(zip(videos, texts, strict=True)):
            meta = {"caption": f"clip {index}", "bucket": name}
            if sources is not None and sources[index] is not None:
                meta["sources"] = sources[index]
            sink.write(fmt.encode_sample(f"clip{index}", video, video[:, :1], text, meta))
    bucket.shards.append(fmt.ShardInfo(rel, len(videos), fmt.sha256_file(root / rel)))
    vae = {
        "class": "AutoencoderKLWan",
        "config_hash": "tiny",
        "latents_mean": [0.0] * 16,
        "latents_std": [1.0] * 16,
    }
    text_encoder = {"name": "umt5-tiny", "max_length": max_length, "dim": text_dim}
    manifest = fmt.Manifest(fmt.FORMAT_VERSION, dataset_id, vae, text_encoder, [bucket], len(videos))
    manifest.save(root)
    if null_text is None:
        null_text = torch.randn(1, text_dim, generator=torch.Generator().manual_seed(9))
    fmt.save_null_text(root, null_text)
    return manifest


def write_config(directory: Path, **changes: object) -> Path:
    """config.json + backends.json (a train and an eval video dataset) in `directory`; returns config.json."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "backends.json").write_text(json.dumps(_video_dataset("clips") + _video_dataset("val")))
    path = directory / "config.json"
    path.write_text(json.dumps({**CONFIG, **changes}))
    return path


def random_clips(
    directory: Path, dataset_id: str = "val", count: int = 2, seed: int = 0, text_dim: int = TEXT_DIM
) -> None:
    """Random clips (unseen by the model) as the shards of dataset `dataset_id` of `directory`'s config.

    write_config names two: "val" (the eval split) and "clips" (the training set).
    """
    gen = torch.Generator().manual_seed(seed)
    videos = [torch.randn(fmt.latent_shape(FRAMES, SIZE, SIZE), generator=gen) for _ in range(count)]
    texts = [torch.randn(2 + i, text_dim, generator=gen) for i in range(count)]
    write_clip_shards(directory / "shards" / dataset_id, videos, texts, dataset_id=dataset_id)


def write_lora(cfg, path: Path, step: int, seed: int = 0) -> Path:
    """A LoRA for the tiny base of `cfg` with random (non-zero) up weights, as training would export it."""
    model = build_base_model(settings_from_config(cfg), torch.device("cpu"))
    lora.inject_lora(model, rank=cfg.lora_rank, alpha=cfg.lora_alpha, targets=cfg.lora_targets)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora.lora_layers(model).values():
            weight = layer.lora_B[lora.ADAPTER].weight
            weight.copy_(0.1 * torch.randn(weight.shape, generator=gen))
    lora.export_lora(model, path, metadata={"base_model": "tiny-random-dit", "step": step})
    return path


def shut_down_leftover_ray() -> None:
    """Shut down a Ray that an earlier test left initialized (a bug of that test), with a warning that says so."""
    import ray

    if ray.is_initialized():
        warnings.warn(
            "an earlier test left Ray initialized (ray.get, ray.get_actor and actor calls start one on their "
            "own); it must shut down the Ray it started. Shutting it down here.",
            stacklevel=2,
        )
        ray.shutdown()


@contextmanager
def local_ray(**init_args: object) -> Iterator[None]:
    """A quiet local Ray (no dashboard, no driver logs) for one test module; shut down when the block ends.

    A Ray left up by an earlier test is shut down first (with a warning), so that this module does not fail with
    "Maybe you called ray.init twice by accident?" for another module's bug.
    """
    import ray

    shut_down_leftover_ray()
    ray.init(include_dashboard=False, logging_level="ERROR", log_to_driver=False, **init_args)
    try:
        yield
    finally:
        ray.shutdown()
