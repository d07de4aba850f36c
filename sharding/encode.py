"""The encode side of a build: turn one planned shard (a list of probed clips) into a finished tar.

A shard is finished when its tar and its sidecar `<tar>.json` both exist, the sidecar lists the planned keys and
the encoders' fingerprint, and the tar's sha256 matches. Tars are written under a temp name and renamed, so an
interrupted build never leaves a half-written shard under a shard's name.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import webdataset as wds

from longcat_dist.data.format import encode_sample, save_null_text, sha256_file
from longcat_dist.data.pixels import read_image, resize_to_bucket
from longcat_dist.encoders import (
    TINY_MAX_LENGTH,
    TINY_TEXT_DIM,
    UMT5_MAX_LENGTH,
    TextEncoder,
    build_text_encoder,
    build_vae,
    encode_frames,
    vae_fingerprint,
)
from sharding.media import read_video

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncoderSpec:
    """Where the encoders come from; travels to Ray actors, so plain values only."""

    tiny: bool = False
    vae_path: str | None = None
    text_encoder_path: str | None = None
    text_encoder_kind: str = "umt5"
    device: str = "cpu"


TEXT_ENCODER_KINDS = ("umt5", "qwen2.5-vl")


def text_encoder_info(spec: EncoderSpec) -> dict:
    """What the manifest's `text_encoder` entry will hold, from the model's config.json alone (no weights read).

    It mirrors what `build_text_encoder` reports once loaded: both kinds pad to UMT5_MAX_LENGTH, and the width is
    the model's hidden size (umT5 `d_model`, Qwen2.5-VL `text_config.hidden_size`).
    """
    kind = spec.text_encoder_kind
    if kind not in TEXT_ENCODER_KINDS:
        raise ValueError(f"text encoder kind {kind!r}: choose one of {list(TEXT_ENCODER_KINDS)}")
    if spec.tiny:
        return {"name": f"{kind}-tiny", "max_length": TINY_MAX_LENGTH, "dim": TINY_TEXT_DIM}
    if spec.text_encoder_path is None:
        raise ValueError(
            "text_encoder_info: give a text encoder path (--text-encoder-path or --checkpoint-root)"
        )
    from transformers import AutoConfig

    path = Path(spec.text_encoder_path)
    # The umT5 loader reads `text_encoder/` of an official checkpoint root, or the directory itself.
    model_dir = (
        path / "text_encoder" if kind == "umt5" and (path / "text_encoder" / "config.json").exists() else path
    )
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: no config.json; expected a {kind} model directory")
    config = AutoConfig.from_pretrained(str(model_dir)).get_text_config()
    return {"name": kind, "max_length": UMT5_MAX_LENGTH, "dim": int(config.hidden_size)}


class Encoders:
    """The VAE and the text encoder, loaded once per process or actor."""

    def __init__(self, spec: EncoderSpec) -> None:
        dtype = torch.bfloat16 if spec.device.startswith("cuda") else torch.float32
        self.vae = build_vae(spec.vae_path, tiny=spec.tiny, device=spec.device, dtype=dtype)
        self.text: TextEncoder = build_text_encoder(
            spec.text_encoder_kind, spec.text_encoder_path, tiny=spec.tiny, device=spec.device
        )
        self.fingerprint = {"vae": vae_fingerprint(self.vae), "text_encoder": self.text.info()}

    def encode_clip(self, clip: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """A probed clip row -> (video latents [16, T, h, w], start-frame latents [16, 1, h, w])."""
        height, width = clip["bucket_size"]
        frames, _ = read_video(Path(clip["clip"]), max_frames=clip["frames"])
        pixels = resize_to_bucket(frames[: clip["frames"]], height, width)  # [3, F, h, w]
        start = resize_to_bucket(read_image(Path(clip["start_frame"]))[None], height, width)  # [3, 1, h, w]
        # The posterior mode keeps shards reproducible; the Wan posterior's std is small next to its mean.
        video = encode_frames(self.vae, pixels[None])[0]
        cond = encode_frames(self.vae, start[None])[0]
        return video, cond

    def write_null_text(self, root: Path) -> None:
        """The empty-prompt embedding for CFG and caption dropout."""
        save_null_text(root, self.text.encode([""])[0])


def sidecar_path(tar: Path) -> Path:
    """Where a shard's completion record lives."""
    return tar.with_name(tar.name + ".json")


def finished(tar: Path, keys: list[str], fingerprint: dict) -> dict | None:
    """The shard's sidecar if the shard is complete for exactly these keys and encoders, else None."""
    side = sidecar_path(tar)
    if not (tar.is_file() and side.is_file()):
        return None
    try:
        record = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if record.get("keys") != keys or record.get("fingerprint") != fingerprint:
        return None
    return record if record.get("sha256") == sha256_file(tar) else None


def _meta(clip: dict, bucket: str) -> dict:
    return {"caption": clip["caption"], "sources": [clip["clip"], clip["start_frame"]], "frames": clip["frames"],
            "fps": clip["fps"], "size": [clip["height"], clip["width"]], "bucket": bucket}  # fmt: skip


def encode_shard(encoders: Encoders, root: Path, shard: dict) -> dict:
    """Write one planned shard ({"path", "bucket", "clips"}) unless finished; returns its sidecar record."""
    tar = root / shard["path"]
    keys = [clip["key"] for clip in shard["clips"]]
    done = finished(tar, keys, encoders.fingerprint)
    if done is not None:
        return {**done, "path": shard["path"], "reused": True}
    tar.parent.mkdir(parents=True, exist_ok=True)
    tmp = tar.with_name(f".{tar.name}.{os.getpid()}.tmp")
    texts = encoders.text.encode([clip["caption"] for clip in shard["clips"]])
    try:
        # A fixed mtime makes a rebuilt shard byte-identical, so its sha256 in the manifest does not change.
        with wds.TarWriter(str(tmp), mtime=0.0) as sink:
            for clip, text in zip(shard["clips"], texts):
                video, cond = encoders.encode_clip(clip)
                sink.write(encode_sample(clip["key"], video, cond, text, _meta(clip, shard["bucket"])))
        os.replace(tmp, tar)
    finally:
        tmp.unlink(missing_ok=True)
    record = {"keys": keys, "num_samples": len(keys), "sha256": sha256_file(tar),
              "fingerprint": encoders.fingerprint}  # fmt: skip
    side = sidecar_path(tar)
    side_tmp = side.with_name(f".{side.name}.{os.getpid()}.tmp")
    side_tmp.write_text(json.dumps(record, indent=1), encoding="utf-8")
    os.replace(side_tmp, side)
    return {**record, "path": shard["path"], "reused": False}


class EncodeActor:
    """Ray Data callable class: one per encode worker, loads the encoders once, writes whole shards."""

    def __init__(self, spec: EncoderSpec, root: str) -> None:
        logging.basicConfig(level=logging.WARNING)
        self.encoders, self.root = Encoders(spec), Path(root)

    def __call__(self, row: dict) -> dict:
        """A shard row (its plan as JSON) -> its record as JSON."""
        shard = json.loads(row["shard"])
        if shard.get("null_text"):
            self.encoders.write_null_text(self.root)
            return {"record": json.dumps({"null_text": True, "fingerprint": self.encoders.fingerprint})}
        return {"record": json.dumps(encode_shard(self.encoders, self.root, shard))}
