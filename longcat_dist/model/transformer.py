"""The LongCat-Video DiT (spec §2): official parameter names, official numerics, I2V conditioning and a KV cache.

Input latents [B, 16, T, H, W] -> tokens [B, T·H/2·W/2, C] -> 48 single-stream blocks (AdaLN per latent frame, 3-D
RoPE self-attention, text cross-attention, SwiGLU) -> per-frame final layer -> [B, 16, T, H, W] fp32, the data-ward
velocity x0 - eps.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

from longcat_dist.model.attention import (
    AttentionSettings,
    BSAParams,
    CrossAttention,
    SelfAttention,
    checkpoint_policy,
    resolve_backend,
)
from longcat_dist.model.layers import (
    CaptionEmbedder,
    FeedForward,
    FinalLayer,
    Fp32Linear,
    LayerNormFp32,
    PatchEmbed3D,
    TimestepEmbedder,
    ffn_hidden_size,
    modulate,
    use_fused_elementwise,
)
from longcat_dist.model.rope import rope_dims

KVCache = dict[int, tuple[Tensor, Tensor]]


@dataclass
class DiTConfig:
    """Constructor arguments of the official model, under the names of its `dit/config.json` (production defaults)."""

    in_channels: int = 16
    out_channels: int = 16
    hidden_size: int = 4096
    depth: int = 48
    num_heads: int = 32
    caption_channels: int = 4096
    mlp_ratio: float = 4.0
    adaln_tembed_dim: int = 512
    frequency_embedding_size: int = 256
    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_tokens_zero_pad: bool = True
    # Backend flags of the official config, kept so that its `dit/config.json` loads strictly. They are never read:
    # the attention backend is chosen by `attention_implementation` (set_attention_backend), one knob for all runs.
    enable_flashattn2: bool = False
    enable_flashattn3: bool = False
    enable_xformers: bool = False
    enable_bsa: bool = False
    bsa_params: dict | None = None
    cp_split_hw: list[int] | None = None
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        self.patch_size = tuple(self.patch_size)
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        rope_dims(self.hidden_size // self.num_heads)
        if self.patch_size[0] != 1:
            raise ValueError(f"patch_size={list(self.patch_size)}: only a temporal patch of 1 is supported")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_dict(cls, values: dict, source: str = "config") -> DiTConfig:
        """Build from an official config dict; diffusers' `_`-keys are kept in `extra`, unknown keys are errors."""
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        extra = {key: value for key, value in values.items() if key.startswith("_")}
        unknown = sorted(set(values) - known - set(extra))
        if unknown:
            hints = [f"{key!r}" + _suggest(key, known) for key in unknown]
            raise ValueError(f"{source}: unknown DiT config key(s) {', '.join(hints)}")
        return cls(**{key: value for key, value in values.items() if key in known}, extra=extra)

    @classmethod
    def from_json(cls, path: str | Path) -> DiTConfig:
        path = Path(path)
        try:
            values = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{path}: invalid JSON at line {error.lineno} column {error.colno}: {error.msg}"
            ) from None
        return cls.from_dict(values, source=str(path))

    def to_dict(self) -> dict:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        values["patch_size"] = list(self.patch_size)
        return {"_class_name": "LongCatVideoTransformer3DModel", **values}


# The tiny random DiT of the demo and the tests (spec §9's first row: 212,672 parameters); its text width 32 is the
# tiny text encoder's.
TINY_DIT = dict(
    hidden_size=64,
    depth=2,
    num_heads=2,
    caption_channels=32,
    adaln_tembed_dim=32,
    frequency_embedding_size=64,
)


def _suggest(key: str, known: set[str]) -> str:
    close = difflib.get_close_matches(key, sorted(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


class LongCatSingleStreamBlock(nn.Module):
    """AdaLN-modulated self-attention, ungated cross-attention and SwiGLU, with fp32 residual islands (§2.8)."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        dim = config.hidden_size
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Fp32Linear(config.adaln_tembed_dim, 6 * dim))
        self.mod_norm_attn = LayerNormFp32(dim, elementwise_affine=False)
        self.mod_norm_ffn = LayerNormFp32(dim, elementwise_affine=False)
        self.pre_crs_attn_norm = LayerNormFp32(dim, elementwise_affine=True)
        self.attn = SelfAttention(dim, config.num_heads)
        self.cross_attn = CrossAttention(dim, config.num_heads)
        self.ffn = FeedForward(dim, ffn_hidden_size(dim, config.mlp_ratio))

    def forward(
        self,
        x: Tensor,
        text: Tensor,
        text_lengths: list[int],
        t_emb: Tensor,
        latent_shape: tuple[int, int, int],
        num_cond_tokens: int,
        settings: AttentionSettings,
        kv_cache: tuple[Tensor, Tensor] | None,
        skip_crs_attn: bool,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """x [B, N, C] in the model dtype; t_emb [B, T, a] fp32; num_cond_tokens leading tokens are clean cond."""
        frames = latent_shape[0]
        fused = use_fused_elementwise(x, settings.fused_elementwise)
        modulation = self.adaLN_modulation(t_emb).unsqueeze(2)  # [B, T, 1, 6C] fp32
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation.chunk(6, dim=-1)

        attn_in = modulate(self.mod_norm_attn, x, shift_msa, scale_msa, frames, fused)
        attn_out, new_kv = self.attn(attn_in, latent_shape, num_cond_tokens, settings, kv_cache)
        x = _gated_add(x, gate_msa, attn_out, frames, fused)
        if not skip_crs_attn:
            x = x + self._cross_attention(x, text, text_lengths, num_cond_tokens, settings.backend, fused)
        ffn_out = self.ffn(modulate(self.mod_norm_ffn, x, shift_mlp, scale_mlp, frames, fused))
        return _gated_add(x, gate_mlp, ffn_out, frames, fused), new_kv

    def _cross_attention(
        self,
        x: Tensor,
        text: Tensor,
        text_lengths: list[int],
        num_cond_tokens: int,
        backend: str,
        fused: bool = False,
    ) -> Tensor:
        # Cond tokens get exactly zero text information; only noise tokens query the text (§2.7).
        normed = self.pre_crs_attn_norm(x)
        noise_out = self.cross_attn(normed[:, num_cond_tokens:], text, text_lengths, backend, fused)
        if num_cond_tokens == 0:
            return noise_out
        cond_out = noise_out.new_zeros(x.shape[0], num_cond_tokens, x.shape[2])
        return torch.cat([cond_out, noise_out], dim=1)


def _gated_add(x: Tensor, gate: Tensor, update: Tensor, frames: int, fused: bool = False) -> Tensor:
    """x + gate ⊙ update per latent frame, computed in fp32 and rounded to x's dtype (§2.12 rule 3).

    fused: one Triton kernel (longcat_dist.kernels.fused_block) instead of the torch ops.
    """
    if fused:
        from longcat_dist.kernels.fused_block import fused_gated_add

        return fused_gated_add(x, gate, update, frames)
    batch, tokens, channels = x.shape
    update = update.view(batch, frames, tokens // frames, channels)
    out = x.view(batch, frames, tokens // frames, channels) + gate * update
    return out.view(batch, tokens, channels).to(x.dtype)


class LongCatVideoTransformer3DModel(nn.Module):
    """The LongCat-Video DiT; `state_dict()` keys and shapes equal the official `dit/` checkpoint's."""

    def __init__(self, config: DiTConfig | None = None):
        super().__init__()
        self.config = config = config or DiTConfig()
        self.patch_size = config.patch_size
        self.x_embedder = PatchEmbed3D(config.patch_size, config.in_channels, config.hidden_size)
        self.t_embedder = TimestepEmbedder(config.adaln_tembed_dim, config.frequency_embedding_size)
        self.y_embedder = CaptionEmbedder(config.caption_channels, config.hidden_size)
        self.blocks = nn.ModuleList(LongCatSingleStreamBlock(config) for _ in range(config.depth))
        patch_features = (
            config.patch_size[0] * config.patch_size[1] * config.patch_size[2] * config.out_channels
        )
        self.final_layer = FinalLayer(config.hidden_size, patch_features, config.adaln_tembed_dim)
        self.attention = AttentionSettings()
        self.checkpoint_interval = 0
        self.checkpoint_saves_attention = False
        self.checkpoint_keeps_kv_copies = True

    @property
    def dtype(self) -> torch.dtype:
        return self.x_embedder.proj.weight.dtype

    def set_attention_backend(self, name: str, bsa: BSAParams | None = None) -> None:
        """Pick the self-attention backend: auto | sdpa | xformers | bsa (errors if it cannot run here).

        auto (the default) runs block-sparse attention, an approximation, for video on CUDA and dense SDPA
        elsewhere; sdpa gives the official model's dense numerics everywhere. The config's enable_bsa is not read.
        """
        self.attention = dataclasses.replace(
            resolve_backend(name, bsa), fused_elementwise=self.attention.fused_elementwise
        )

    def set_fused_elementwise(self, enabled: bool) -> None:
        """Run the blocks' fp32 islands as fused Triton kernels on CUDA tensors, or as plain torch ops (the default)."""
        self.attention = dataclasses.replace(self.attention, fused_elementwise=enabled)

    def enable_gradient_checkpointing(
        self, interval: int = 1, save_attention: bool = False, keep_kv_copies: bool = True
    ) -> None:
        """Recompute every `interval`-th block in the backward pass (0 turns checkpointing off).

        save_attention: keep self-attention's output and log-sum-exp (torch SDPA or the block-sparse kernel)
        through the checkpoint instead of recomputing them: one [N, C] activation per block more memory (0.29 GiB
        at 93x480x832), one attention forward less per block (~40 ms dense, ~7 ms block-sparse at that size).
        The block-sparse selection is always kept (see checkpoint_policy).

        keep_kv_copies: where the recompute runs block-sparse attention (save_attention off), its K/V copies stay
        for the block's backward instead of being made again there: 0.37 ms less per block at 93x480x832, and two
        K-sized tensors more at the block's backward peak (0.7 GiB there, 1.8 GiB at 261 frames).
        """
        if interval < 0:
            raise ValueError(f"gradient_checkpointing_interval={interval} must be >= 0")
        self.checkpoint_interval = interval
        self.checkpoint_saves_attention = save_attention
        self.checkpoint_keeps_kv_copies = keep_kv_copies

    def forward(
        self,
        hidden_states: Tensor,
        timestep: Tensor,
        encoder_hidden_states: Tensor,
        encoder_attention_mask: Tensor | None = None,
        num_cond_latents: int = 0,
        kv_cache: KVCache | None = None,
        return_kv: bool = False,
        skip_crs_attn: bool = False,
    ) -> Tensor | tuple[Tensor, KVCache]:
        """Predict x0 - eps [B, 16, T, H, W] (fp32) for latents [B, 16, T, H, W].

        Args:
            timestep: [B] or [B, T] on the 0..1000 scale, one value per latent frame (cond frames get 0).
            encoder_hidden_states: text [B, 1, L, D] (or [B, L, D]); encoder_attention_mask [B, L].
            num_cond_latents: leading clean cond frames; with kv_cache, the cached frames in front of the input.
            kv_cache: per-block (k, v) of the cond frames, recorded by a call with return_kv=True.
        """
        batch, frames, height, width = self._check_inputs(hidden_states, num_cond_latents, kv_cache)
        dtype = self.dtype
        grid = (frames, height // self.patch_size[1], width // self.patch_size[2])
        tokens_per_frame = grid[1] * grid[2]
        x = self.x_embedder(hidden_states.to(dtype))  # [B, N, C]
        t_emb = self._embed_timesteps(timestep, batch, frames)  # [B, T, a] fp32
        text, text_lengths = self._embed_text(encoder_hidden_states, encoder_attention_mask, batch)
        num_cond_tokens = 0 if kv_cache is not None else num_cond_latents * tokens_per_frame
        recorded: KVCache = {}
        # A checkpointed block that recomputes attention keeps the block-sparse forward's K/V copies for the
        # backward: autograd holds them only from that recompute to the block's backward.
        keep = self.checkpoint_keeps_kv_copies and not self.checkpoint_saves_attention
        recomputing = dataclasses.replace(self.attention, keep_packed_kv=keep)
        for index, block in enumerate(self.blocks):
            block_cache = None if kv_cache is None else kv_cache[index]
            if self._checkpointed(index):
                args = (x, text, text_lengths, t_emb, grid, num_cond_tokens, recomputing)
                x, new_kv = checkpoint(block, *args, block_cache, skip_crs_attn, use_reentrant=False,
                                       **self._checkpoint_options())  # fmt: skip
            else:
                args = (x, text, text_lengths, t_emb, grid, num_cond_tokens, self.attention)
                x, new_kv = block(*args, block_cache, skip_crs_attn)
            if return_kv:
                recorded[index] = new_kv
        out = self._unpatchify(self.final_layer(x, t_emb), grid)
        return (out, recorded) if return_kv else out

    def _checkpoint_options(self) -> dict:
        policy = checkpoint_policy(self.checkpoint_saves_attention)
        return {"context_fn": lambda: create_selective_checkpoint_contexts(policy)}

    def _checkpointed(self, index: int) -> bool:
        return self.training and self.checkpoint_interval > 0 and index % self.checkpoint_interval == 0

    def _check_inputs(
        self, latents: Tensor, num_cond_latents: int, kv_cache: KVCache | None
    ) -> tuple[int, int, int, int]:
        if latents.ndim != 5 or latents.shape[1] != self.config.in_channels:
            raise ValueError(
                f"hidden_states must be latents [B, {self.config.in_channels}, T, H, W]; got {list(latents.shape)}"
            )
        batch, _, frames, height, width = latents.shape
        if height % self.patch_size[1] or width % self.patch_size[2]:
            raise ValueError(
                f"latent height and width must be even (patch {list(self.patch_size[1:])}); got {height}x{width}. "
                "Pixel sizes must be divisible by 16."
            )
        if kv_cache is None and not 0 <= num_cond_latents <= frames:
            raise ValueError(
                f"num_cond_latents={num_cond_latents} must lie in [0, {frames}] (the latent frames)"
            )
        if kv_cache is not None:
            tokens_per_frame = (height // self.patch_size[1]) * (width // self.patch_size[2])
            self._check_kv_cache(kv_cache, num_cond_latents, batch, tokens_per_frame)
        return batch, frames, height, width

    def _check_kv_cache(
        self, kv_cache: KVCache, num_cond_latents: int, batch: int, tokens_per_frame: int
    ) -> None:
        if num_cond_latents <= 0:
            raise ValueError("a kv_cache needs num_cond_latents > 0 (the number of cached cond frames)")
        if len(kv_cache) != len(self.blocks):
            raise ValueError(f"kv_cache holds {len(kv_cache)} blocks; the model has {len(self.blocks)}")
        cache_batch, _, cache_tokens, _ = kv_cache[0][0].shape
        if cache_batch not in (1, batch):
            raise ValueError(f"kv_cache batch {cache_batch} must be 1 or equal the input batch {batch}")
        # The cache length, not num_cond_latents, would place RoPE and the keys: a mismatch must not pass silently.
        if cache_tokens != num_cond_latents * tokens_per_frame:
            raise ValueError(
                f"kv_cache holds {cache_tokens / tokens_per_frame:g} cond frames ({cache_tokens} tokens of "
                f"{tokens_per_frame} per frame) but num_cond_latents={num_cond_latents}; pass the number of frames "
                "the cache was recorded from, at the same latent height and width"
            )

    def _embed_timesteps(self, timestep: Tensor, batch: int, frames: int) -> Tensor:
        if timestep.ndim == 1:
            timestep = timestep[:, None].expand(-1, frames)
        if tuple(timestep.shape) != (batch, frames):
            raise ValueError(
                f"timestep must be [B] or [B, T] = [{batch}, {frames}]; got {list(timestep.shape)}"
            )
        # Rounded to the model dtype first, as the official model does (§2.12 rule 1).
        rounded = timestep.to(self.dtype).float().flatten()
        return self.t_embedder(rounded).view(batch, frames, -1)

    def _embed_text(self, text: Tensor, mask: Tensor | None, batch: int) -> tuple[Tensor, list[int]]:
        """Project the text and pack it to [ΣL_b, C] with per-sample lengths (§2.9.3)."""
        if text.ndim == 3:
            text = text[:, None]
        if text.ndim != 4 or text.shape[0] != batch or text.shape[-1] != self.config.caption_channels:
            raise ValueError(
                f"encoder_hidden_states must be [B={batch}, 1, L, {self.config.caption_channels}]; "
                f"got {list(text.shape)}"
            )
        projected = self.y_embedder(text.to(self.dtype))[:, 0]  # [B, L, C]
        length = projected.shape[1]
        if mask is None:
            return projected.reshape(batch * length, -1), [length] * batch
        mask = mask.reshape(batch, -1)
        if mask.shape[1] != length:
            raise ValueError(f"encoder_attention_mask has {mask.shape[1]} tokens; the text has {length}")
        if self.config.text_tokens_zero_pad:
            # Padded tokens become zero vectors that still take part in cross-attention (official quirk).
            projected = projected * mask[:, :, None].to(projected.dtype)
            return projected.reshape(batch * length, -1), [length] * batch
        keep = mask.bool()
        lengths = keep.sum(dim=1).tolist()
        if min(lengths) == 0:
            raise ValueError("encoder_attention_mask has a sample with no text tokens")
        return projected[keep], lengths

    def _unpatchify(self, x: Tensor, grid: tuple[int, int, int]) -> Tensor:
        """[B, N, pt·ph·pw·C] -> [B, C, T·pt, Hp·ph, Wp·pw]; features are ordered (t_p, h_p, w_p, c)."""
        frames, height, width = grid
        pt, ph, pw = self.patch_size
        x = x.view(x.shape[0], frames, height, width, pt, ph, pw, self.config.out_channels)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(x.shape[0], self.config.out_channels, frames * pt, height * ph, width * pw).float()

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dtype: torch.dtype = torch.bfloat16,
        device: str | torch.device = "cpu",
        linear_transform=None,
    ) -> LongCatVideoTransformer3DModel:
        """Load the official `dit/` layout (config.json + safetensors, sharded with an index) strictly."""
        from longcat_dist.model.weights import load_pretrained

        return load_pretrained(cls, path, dtype=dtype, device=device, linear_transform=linear_transform)

    def save_pretrained(self, directory: str | Path, max_shard_size_bytes: int = 5 * 2**30) -> None:
        """Write config.json and safetensors shards with an index, in the official layout."""
        from longcat_dist.model.weights import save_pretrained

        save_pretrained(self, directory, max_shard_size_bytes=max_shard_size_bytes)
