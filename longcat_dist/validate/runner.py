"""One validation: the base model loaded once, a LoRA applied per request, every item sampled, media written."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from longcat_dist.config import TrainConfig
from longcat_dist.encoders import build_text_encoder, build_vae, decode_latents, encode_frames
from longcat_dist.model import lora
from longcat_dist.model.attention import BSAParams
from longcat_dist.model.transformer import TINY_DIT, DiTConfig, LongCatVideoTransformer3DModel
from longcat_dist.validate.eval_set import EvalItem, prompt_item, read_eval_split
from longcat_dist.validate.gallery import ERROR_FILE, METRICS_FILE, step_dir
from longcat_dist.validate.media import (
    contact_row,
    contact_sheet,
    frames_to_uint8,
    image_to_uint8,
    load_start_frame,
    write_mp4,
)
from longcat_dist.validate.metrics import first_frame_drift, latent_errors
from longcat_dist.validate.queue import ValidationRequest
from longcat_dist.validate.sampler import latent_frames_for, pad_prompts, sample_i2v
from longcat_dist.validate.summaries import ValidationSummaries

logger = logging.getLogger(__name__)

CONTACT_FRAMES = 4
SHEET_FILE = "contact_sheet.png"
# What first-frame drift was measured against, recorded per sample as `first_frame_reference`.
START_IMAGE = "start_image"
COND_DECODE = "vae_decode_of_cond_latent"


@dataclass(frozen=True)
class ValidationSettings:
    """The values validation needs, taken from the training config (plain data, sent to the Ray actor)."""

    output_dir: Path
    tensorboard_dir: Path | None
    checkpoint: (
        Path | None
    )  # the LongCat-Video checkpoint root (dit/, vae/, text_encoder/); None with tiny_model
    tiny_model: bool
    model_seed: int  # the training seed: the tiny random base is rebuilt from it
    text_encoder: str
    attention: str
    bsa: BSAParams
    eval_root: Path | None  # shard root of the eval split; None: validate `prompt` on `start_frame`
    prompt: str | None
    start_frame: Path | None
    negative_prompt: str
    height: int
    width: int
    num_frames: int
    num_steps: int
    guidance: float
    shift: float
    seed: int
    fps: int
    log_level: str = "WARNING"


def settings_from_config(cfg: TrainConfig) -> ValidationSettings:
    """Validation settings from a loaded TrainConfig (the eval split's shard root when using datasets)."""
    eval_root = None
    if cfg.validation_using_datasets:
        eval_root = cfg.dataset(cfg.eval_dataset_id).cache_dir_vae
    return ValidationSettings(
        output_dir=Path(cfg.output_dir),
        tensorboard_dir=Path(cfg.logging_dir) / "validation" if cfg.report_to == "tensorboard" else None,
        checkpoint=cfg.pretrained_model_name_or_path,
        tiny_model=cfg.tiny_model,
        model_seed=cfg.seed,
        text_encoder=cfg.text_encoder,
        attention=cfg.attention_implementation,
        bsa=BSAParams(cfg.bsa_sparsity, tuple(cfg.bsa_chunk_shape)),
        eval_root=eval_root,
        prompt=cfg.validation_prompt,
        start_frame=cfg.validation_start_frame,
        negative_prompt=cfg.validation_negative_prompt,
        height=cfg.validation_height,
        width=cfg.validation_width,
        num_frames=cfg.validation_num_video_frames,
        num_steps=cfg.validation_num_inference_steps,
        guidance=cfg.validation_guidance,
        shift=cfg.flow_schedule_shift,
        seed=cfg.validation_seed,
        fps=cfg.framerate,
    )


def build_base_model(settings: ValidationSettings, device: torch.device) -> nn.Module:
    """The frozen DiT (tiny random from the training seed, or the checkpoint's `dit/`), bf16 on GPU, fp32 on CPU."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if settings.tiny_model:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(settings.model_seed)
            model = LongCatVideoTransformer3DModel(DiTConfig(**TINY_DIT)).to(device, dtype)
    else:
        model = LongCatVideoTransformer3DModel.from_pretrained(settings.checkpoint, dtype, device)
    model.set_attention_backend(settings.attention, settings.bsa)
    return model.eval().requires_grad_(False)


class ValidationRunner:
    """Holds the base DiT, the VAE and the eval items; `run` validates one LoRA and writes its step folder."""

    def __init__(
        self, settings: ValidationSettings, device: torch.device | None = None, *, progress: bool = False
    ) -> None:
        self.settings = settings
        self.progress = progress  # per-step bars for interactive use; the actor only logs
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = build_base_model(settings, self.device)
        vae_dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.vae = build_vae(
            settings.checkpoint, tiny=settings.tiny_model, device=self.device, dtype=vae_dtype
        )
        # The negative prompt's embedding [L, D] that CFG uses: the shards' null text unless the user gave one.
        self.items, self.negative_text, self._text_length = self._load_items()
        self._references: dict[str, tuple[Any, Any, str]] = {}
        self._summaries = ValidationSummaries(settings.tensorboard_dir) if settings.tensorboard_dir else None

    def _text_encoder(self):
        checkpoint = None if self.settings.tiny_model else self.settings.checkpoint
        return build_text_encoder(self.settings.text_encoder, checkpoint, tiny=self.settings.tiny_model)

    def _load_items(self) -> tuple[list[EvalItem], torch.Tensor, int]:
        """Items plus the negative embedding and the text length to pad to; the text encoder is dropped after."""
        settings, encoder, null_text = self.settings, None, None
        if settings.eval_root is not None:
            items, null_text, manifest = read_eval_split(Path(settings.eval_root))
            max_length = int(manifest.text_encoder["max_length"])
        else:
            if settings.prompt is None or settings.start_frame is None:
                raise ValueError("validation without an eval split needs a prompt and a start frame")
            encoder = self._text_encoder()
            pixels = load_start_frame(Path(settings.start_frame), settings.height, settings.width)
            frames = pixels[None, :, None]  # [1, 3, 1, H, W]
            # The official pipeline samples the posterior (spec §4.2); its own generator keeps runs repeatable.
            generator = torch.Generator(self.device).manual_seed(settings.seed)
            cond = encode_frames(self.vae, frames, generator=generator, sample=True)[0]  # [16, 1, h, w]
            text = encoder.encode([settings.prompt])[0]
            items = [prompt_item(text, settings.prompt, pixels, cond)]
            max_length = encoder.max_length
        if settings.negative_prompt or null_text is None:
            encoder = encoder or self._text_encoder()
            negative = encoder.encode([settings.negative_prompt])[0]
        else:
            negative = null_text
        return items, negative, max_length

    def apply_lora(self, lora_path: str | None) -> None:
        """Load the LoRA at `lora_path` into the model's LoRA layers; None runs the base model alone."""
        if lora_path is not None:
            lora.load_lora(self.model, lora_path)
        for layer in lora.lora_layers(self.model).values():
            layer.enable_adapters(lora_path is not None)
        self.model.requires_grad_(False)

    def generate(self, item: EvalItem, index: int) -> torch.Tensor:
        """Sample one item's latents [16, T, h, w] (fp32) with the current LoRA, seeded per item."""
        settings = self.settings
        frames = item.truth.shape[1] if item.truth is not None else latent_frames_for(settings.num_frames)
        # With text_tokens_zero_pad the official pipeline pads to the encoder's max length; it changes the output.
        length = self._text_length if self.model.config.text_tokens_zero_pad else None
        text, mask, negative, negative_mask = pad_prompts([item.text], [self.negative_text], length)
        generator = torch.Generator().manual_seed(settings.seed + index)
        latents = sample_i2v(self.model, item.cond_latents[None], text, mask, negative_text=negative,
                             negative_mask=negative_mask, num_latent_frames=frames, num_steps=settings.num_steps,
                             guidance=settings.guidance, shift=settings.shift, generators=[generator],
                             progress=self.progress)  # fmt: skip
        return latents[0].cpu()

    def _reference(self, item: EvalItem) -> tuple[torch.Tensor, Any, str]:
        """An item's start frame [3, H, W], ground-truth frames (uint8) and what the start frame is, decoded once.

        Without the start image the start frame is the decoded cond latent, against which the drift is 0 by
        construction (the sampler never changes latent frame 0); the name recorded says so.
        """
        if item.key not in self._references:
            start, reference = item.start_pixels, START_IMAGE
            if start is None:
                start = decode_latents(self.vae, item.cond_latents[None])[0, :, 0].cpu()  # [3, H, W]
                reference = COND_DECODE
            truth = None
            if item.truth is not None:
                truth = frames_to_uint8(decode_latents(self.vae, item.truth[None])[0])
            self._references[item.key] = (start, truth, reference)
        return self._references[item.key]

    def run(self, request: ValidationRequest) -> dict[str, Any]:
        """Validate one LoRA: an MP4 per item, a contact sheet, metrics.json and summaries under step_<k>/."""
        started, started_at = time.perf_counter(), time.time()
        self.apply_lora(request.lora_path)
        folder = step_dir(self.settings.output_dir, request.step)
        folder.mkdir(parents=True, exist_ok=True)
        records, rows = [], []
        for index, item in enumerate(tqdm(self.items, desc=f"validation step {request.step}", leave=False)):
            latents = self.generate(item, index)
            frames = decode_latents(self.vae, latents[None])[0].cpu()  # [3, F, H, W] in [-1, 1]
            video = frames_to_uint8(frames)
            write_mp4(video, folder / f"{item.key}.mp4", self.settings.fps)
            start, truth, reference = self._reference(item)
            record = {"key": item.key, "caption": item.caption, "video": f"{item.key}.mp4"}
            record |= first_frame_drift(frames, start) | {"first_frame_reference": reference}
            if item.truth is not None:
                record |= latent_errors(latents, item.truth)
            records.append(record)
            rows.append(contact_row(image_to_uint8(start), video, truth, CONTACT_FRAMES))
            if self._summaries is not None:
                self._summaries.video(request.step, f"validation/video/{item.key}", video, self.settings.fps)
        sheet = contact_sheet(rows)
        sheet.save(folder / SHEET_FILE)
        report = _report(request, records, started_at, time.perf_counter() - started)
        _write_json(folder / METRICS_FILE, report)
        if self._summaries is not None:
            self._summaries.scalars(request.step, {f"validation/{k}": v for k, v in report["mean"].items()})
            self._summaries.image(request.step, "validation/contact_sheet", sheet)
            self._summaries.flush()
        logger.info(
            "validation of step %d done in %.1f s: %s", request.step, report["seconds"], report["mean"]
        )
        return report

    def record_failure(self, request: ValidationRequest, trace: str) -> None:
        """Leave the traceback as error.txt in the step folder, where the gallery reports it."""
        folder = step_dir(self.settings.output_dir, request.step)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / ERROR_FILE).write_text(f"lora: {request.lora_path}\n{trace}")

    def close(self) -> None:
        """Close the TensorBoard writer."""
        if self._summaries is not None:
            self._summaries.close()


def _report(
    request: ValidationRequest, records: list[dict], started_at: float, seconds: float
) -> dict[str, Any]:
    numeric = sorted({k for r in records for k, v in r.items() if isinstance(v, float)})
    mean = {k: sum(r[k] for r in records if k in r) / sum(k in r for r in records) for k in numeric}
    return {"step": request.step, "lora_path": request.lora_path, "started_at": started_at, "seconds": seconds,
            "mean": mean, "samples": records}  # fmt: skip


def _strict(value: Any) -> Any:
    """JSON-ready: a non-finite float (the inf PSNR of a perfect match) becomes null, so the file stays strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_strict(v) for v in value]
    return value


def _write_json(path: Path, data: dict) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(_strict(data), indent=2, allow_nan=False))
    os.replace(temporary, path)
