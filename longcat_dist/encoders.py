"""The encoders that run when shards are built: the Wan 2.1 VAE (diffusers) and the text encoder (umT5 by default).

Validation uses the VAE decoder too. Both come as real weights from a local directory (official LongCat-Video
layout: `vae/`, `text_encoder/`, `tokenizer/` under the checkpoint root) or as tiny seeded random models for tests
and the demo, built without any download.
"""

from __future__ import annotations

import hashlib
import html
import json
import logging
import re
from pathlib import Path

import ftfy
import torch
from diffusers import AutoencoderKLWan
from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece
from torch import Tensor
from transformers import PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

UMT5_MAX_LENGTH = 512  # spec §4.1: the official pipeline pads/truncates every prompt to 512 tokens
TINY_TEXT_DIM = 32  # = caption_channels of the tiny DiT configs (spec §9)
TINY_MAX_LENGTH = 64
TINY_SEED = 0
VAE_TEMPORAL_FACTOR = 4
# A tiny Wan VAE: same z_dim, the same x4 temporal / x8 spatial factors (3 down stages), narrow channels.
TINY_VAE_CONFIG = {"base_dim": 8, "z_dim": 16, "dim_mult": [1, 2, 2, 2], "num_res_blocks": 1,
                   "temperal_downsample": [False, True, True]}  # fmt: skip
# Words of the demo captions get their own tokens; anything else falls back to letters (WordPiece).
_TINY_WORDS = (
    "a an the and of to in on with is moves moving move left right up down stays still slowly quickly across "
    "red green blue yellow white black orange purple cyan magenta square circle triangle ball box shape "
    "small large big background frame video clip scene"
).split()


def _subdir(path: str | Path, name: str, marker: str) -> Path:
    """`path/name` when `path` is a checkpoint root holding it, else `path` itself."""
    path = Path(path)
    candidate = path / name
    return candidate if (candidate / marker).exists() else path


def build_vae(
    path: str | Path | None = None, *, tiny: bool = False, device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> AutoencoderKLWan:  # fmt: skip
    """The Wan 2.1 VAE from a local dir (`vae/` or the checkpoint root), or a tiny seeded random one."""
    if tiny:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(TINY_SEED)
            vae = AutoencoderKLWan(**TINY_VAE_CONFIG)
        if dtype != torch.float32:
            vae = vae.to(dtype=dtype)
    else:
        if path is None:
            raise ValueError("build_vae: give a VAE path (--vae-path or --checkpoint-root) or tiny=True")
        vae_dir = _subdir(path, "vae", "config.json")
        if not (vae_dir / "config.json").is_file():
            raise FileNotFoundError(
                f"{vae_dir}: no config.json; expected a diffusers AutoencoderKLWan directory"
            )
        vae = AutoencoderKLWan.from_pretrained(str(vae_dir), torch_dtype=dtype)
    # from_pretrained already cast; a plain .to(dtype) here would make diffusers warn about fp32-kept modules.
    return vae.to(device).eval().requires_grad_(False)


def latent_stats(vae: AutoencoderKLWan) -> tuple[Tensor, Tensor]:
    """Per-channel latent mean and std [16] (fp32) from the VAE config (spec §4.2)."""
    mean, std = vae.config.get("latents_mean"), vae.config.get("latents_std")
    if mean is None or std is None:
        raise ValueError("VAE config has no latents_mean/latents_std: use the checkpoint's vae/config.json")
    return torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)


def vae_fingerprint(vae: AutoencoderKLWan) -> dict:
    """What the manifest records about the VAE: class, config hash, latent mean and std."""
    config = {k: v for k, v in dict(vae.config).items() if not k.startswith("_")}
    blob = json.dumps(config, sort_keys=True, default=str).encode("utf-8")
    mean, std = latent_stats(vae)  # validates that the config has them
    return {"class": type(vae).__name__, "config_hash": hashlib.sha256(blob).hexdigest(),
            "latents_mean": [float(v) for v in config["latents_mean"]],
            "latents_std": [float(v) for v in config["latents_std"]]}  # fmt: skip


def vae_config_fingerprint(path: str | Path | None = None, *, tiny: bool = False) -> dict:
    """The VAE fingerprint from its config alone (no weights read): what a manifest's `vae` entry will hold."""
    if tiny:
        return vae_fingerprint(build_vae(tiny=True))
    if path is None:
        raise ValueError("vae_config_fingerprint: give a VAE path or tiny=True")
    config = AutoencoderKLWan.load_config(str(_subdir(path, "vae", "config.json")))
    with torch.device("meta"):  # the fingerprint needs the config only; skip allocating weights
        vae = AutoencoderKLWan.from_config(config)
    return vae_fingerprint(vae)


def _broadcast(stat: Tensor, like: Tensor) -> Tensor:
    return stat.to(like.device).view(1, -1, 1, 1, 1)


@torch.no_grad()
def encode_frames(
    vae: AutoencoderKLWan, frames: Tensor, *, generator: torch.Generator | None = None, sample: bool = False
) -> Tensor:
    """Frames [B, 3, F, H, W] in [-1, 1] -> normalized latents [B, 16, T, h, w] fp32 (posterior mode unless sample)."""
    if frames.ndim != 5 or frames.shape[1] != 3:
        raise ValueError(f"encode_frames: frames must be [B, 3, F, H, W], found {list(frames.shape)}")
    if (frames.shape[2] - 1) % VAE_TEMPORAL_FACTOR != 0:
        raise ValueError(f"encode_frames: {frames.shape[2]} frames; the Wan VAE needs (frames - 1) % 4 == 0")
    posterior = vae.encode(frames.to(vae.device, vae.dtype)).latent_dist
    latents = posterior.sample(generator=generator) if sample else posterior.mode()
    latents = latents.float()  # [B, 16, T, h, w]
    mean, std = latent_stats(vae)
    return (latents - _broadcast(mean, latents)) / _broadcast(std, latents)


@torch.no_grad()
def decode_latents(vae: AutoencoderKLWan, latents: Tensor) -> Tensor:
    """Normalized latents [B, 16, T, h, w] -> frames [B, 3, F, H, W] in [-1, 1] (fp32, clamped)."""
    mean, std = latent_stats(vae)
    latents = latents.float()
    raw = latents * _broadcast(std, latents) + _broadcast(mean, latents)
    frames = vae.decode(raw.to(vae.device, vae.dtype)).sample  # [B, 3, F, H, W]
    return frames.float().clamp(-1.0, 1.0)


def clean_prompt(text: str) -> str:
    """Official prompt cleaning (spec §4.1): ftfy, HTML-unescape twice, collapse whitespace."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip()


class TextEncoder:
    """A tokenizer + encoder pair that turns prompts into unpadded embeddings [L_valid, D] bf16."""

    def __init__(self, name: str, tokenizer, model: torch.nn.Module, *, max_length: int, dim: int,
                 append_eos: bool = False) -> None:  # fmt: skip
        self.name, self.tokenizer, self.model = name, tokenizer, model.eval().requires_grad_(False)
        self.max_length, self.dim = max_length, dim
        # Decoder-only tokenizers add no EOS, so "" would have no token at all; the contract needs L_valid >= 1.
        self.append_eos = append_eos

    @property
    def device(self) -> torch.device:
        """Where the encoder's weights live."""
        return next(self.model.parameters()).device

    def info(self) -> dict:
        """What the manifest records about the text encoder."""
        return {"name": self.name, "max_length": self.max_length, "dim": self.dim}

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> list[Tensor]:
        """Each prompt -> its embedding [L_valid, D] bf16 (no padding rows)."""
        cleaned = [clean_prompt(p) for p in prompts]
        if self.append_eos:
            cleaned = [p + self.tokenizer.eos_token for p in cleaned]
        tokens = self.tokenizer(cleaned, padding="max_length", max_length=self.max_length, truncation=True,
                                add_special_tokens=True, return_tensors="pt")  # fmt: skip
        input_ids = tokens.input_ids.to(self.device)  # [B, max_length]
        mask = tokens.attention_mask.to(self.device)  # [B, max_length]
        hidden = self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state  # [B, max_length, D]
        lengths = mask.sum(dim=1).tolist()
        return [hidden[i, : int(n)].to("cpu", torch.bfloat16).clone() for i, n in enumerate(lengths)]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A small WordPiece tokenizer built in memory (T5-style ids: pad 0, eos 1, unk 2; EOS appended)."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
    pieces = ["<pad>", "</s>", "<unk>", *_TINY_WORDS, *letters, *[f"##{c}" for c in letters], *".,;:!?'-\"()"]
    vocab = {piece: i for i, piece in enumerate(dict.fromkeys(pieces))}
    tok = Tokenizer(WordPiece(vocab, unk_token="<unk>", max_input_chars_per_word=64))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )


def _tiny_umt5(vocab_size: int) -> torch.nn.Module:
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(vocab_size=vocab_size, d_model=TINY_TEXT_DIM, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                        relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=0, eos_token_id=1)  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        return UMT5EncoderModel(config)


def _tiny_qwen(vocab_size: int) -> torch.nn.Module:
    from transformers import Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel

    config = Qwen2_5_VLTextConfig(
        vocab_size=vocab_size, hidden_size=TINY_TEXT_DIM, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=TINY_MAX_LENGTH,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        pad_token_id=0, bos_token_id=1, eos_token_id=1,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        return Qwen2_5_VLTextModel(config)


def build_text_encoder(
    kind: str = "umt5",
    path: str | Path | None = None,
    *,
    tiny: bool = False,
    device: str | torch.device = "cpu",
) -> TextEncoder:
    """umT5 (official, spec §4.1) or Qwen2.5-VL text features, from a local dir or tiny and random."""
    if kind not in ("umt5", "qwen2.5-vl"):
        raise ValueError(f"text encoder kind {kind!r}: choose 'umt5' or 'qwen2.5-vl'")
    if kind == "qwen2.5-vl":
        logger.warning(
            "qwen2.5-vl text features: the official LongCat-Video weights were trained on umT5 features"
        )
    if tiny:
        tokenizer = tiny_tokenizer()
        build = _tiny_umt5 if kind == "umt5" else _tiny_qwen
        model = build(len(tokenizer))
        # The tiny tokenizer appends EOS itself (T5-style), for both kinds.
        encoder = TextEncoder(f"{kind}-tiny", tokenizer, model, max_length=TINY_MAX_LENGTH, dim=TINY_TEXT_DIM)
    elif path is None:
        raise ValueError(
            "build_text_encoder: give a path (--text-encoder-path or --checkpoint-root) or tiny=True"
        )
    elif kind == "umt5":
        encoder = _load_umt5(path)
    else:
        encoder = _load_qwen(path)
    encoder.model.to(device)
    return encoder


def _load_umt5(path: str | Path) -> TextEncoder:
    from transformers import AutoTokenizer, UMT5EncoderModel

    model_dir = _subdir(path, "text_encoder", "config.json")
    tokenizer_dir = _subdir(path, "tokenizer", "tokenizer_config.json")
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: no config.json; expected a UMT5EncoderModel directory")
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    model = UMT5EncoderModel.from_pretrained(str(model_dir), dtype=torch.bfloat16)
    return TextEncoder("umt5", tokenizer, model, max_length=UMT5_MAX_LENGTH, dim=model.config.d_model)


def _load_qwen(path: str | Path) -> TextEncoder:
    from transformers import AutoTokenizer, Qwen2_5_VLModel

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = Qwen2_5_VLModel.from_pretrained(str(path), dtype=torch.bfloat16).language_model
    return TextEncoder("qwen2.5-vl", tokenizer, model, max_length=UMT5_MAX_LENGTH,
                       dim=model.config.hidden_size, append_eos=True)  # fmt: skip
