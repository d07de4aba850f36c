"""save_pretrained / from_pretrained in the official dit/ layout: sharding, strictness, the load-time hook."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from longcat_dist.model.transformer import LongCatVideoTransformer3DModel
from longcat_dist.model.weights import INDEX_NAME, WEIGHTS_NAME
from tests.model.test_transformer import inputs, tiny_model


def test_sharded_round_trip_reproduces_the_outputs(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path / "dit", max_shard_size_bytes=200_000)
    index = json.loads((tmp_path / "dit" / INDEX_NAME).read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) >= 3 and len(index["weight_map"]) == len(model.state_dict())
    # The official checkpoint root (with a dit/ subfolder) loads as well.
    loaded = LongCatVideoTransformer3DModel.from_pretrained(tmp_path, dtype=torch.float32).eval()
    latents, timesteps, text = inputs()
    with torch.no_grad():
        assert torch.equal(
            loaded(latents, timesteps, text, num_cond_latents=1),
            model(latents, timesteps, text, num_cond_latents=1),
        )
    assert loaded.config == model.config


def test_single_file_loads_in_bf16_on_request(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    assert (tmp_path / WEIGHTS_NAME).is_file() and not (tmp_path / INDEX_NAME).exists()
    loaded = LongCatVideoTransformer3DModel.from_pretrained(tmp_path)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert torch.equal(loaded.blocks[1].ffn.w2.weight, model.blocks[1].ffn.w2.weight.to(torch.bfloat16))


def _rewrite(tmp_path, edit):
    tiny_model().save_pretrained(tmp_path)
    state = load_file(tmp_path / WEIGHTS_NAME)
    edit(state)
    save_file(state, tmp_path / WEIGHTS_NAME)


def test_a_missing_key_is_named(tmp_path):
    _rewrite(tmp_path, lambda s: s.pop("blocks.1.attn.q_norm.weight"))
    with pytest.raises(ValueError, match=r"1 missing key\(s\): blocks.1.attn.q_norm.weight"):
        LongCatVideoTransformer3DModel.from_pretrained(tmp_path)


def test_an_unexpected_key_is_named(tmp_path):
    _rewrite(tmp_path, lambda s: s.update({"blocks.9.attn.qkv.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"1 unexpected key\(s\): blocks.9.attn.qkv.weight"):
        LongCatVideoTransformer3DModel.from_pretrained(tmp_path)


def test_a_wrong_shape_is_named(tmp_path):
    _rewrite(tmp_path, lambda s: s.update({"final_layer.linear.bias": torch.zeros(32)}))
    with pytest.raises(
        ValueError, match=r"final_layer.linear.bias has shape \[32\]; the model expects \[64\]"
    ):
        LongCatVideoTransformer3DModel.from_pretrained(tmp_path)


def test_missing_directory_and_bad_config_are_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="dit/ subfolder"):
        LongCatVideoTransformer3DModel.from_pretrained(tmp_path)
    tiny_model().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["num_layers"] = 3
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="'num_layers'"):
        LongCatVideoTransformer3DModel.from_pretrained(tmp_path)


def test_linear_transform_sees_every_linear_once_by_its_checkpoint_name(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    seen = []

    class Tagged(nn.Module):
        def __init__(self, linear):
            super().__init__()
            self.inner = linear

        def forward(self, x):
            return self.inner(x)

    def transform(name, linear):
        seen.append(name)
        return Tagged(linear) if name.endswith("ffn.w1") else linear

    loaded = LongCatVideoTransformer3DModel.from_pretrained(
        tmp_path, dtype=torch.float32, linear_transform=transform
    )
    expected = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert sorted(seen) == sorted(expected)
    assert isinstance(loaded.blocks[0].ffn.w1, Tagged) and isinstance(loaded.blocks[1].ffn.w1, Tagged)
    latents, timesteps, text = inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(latents, timesteps, text), model(latents, timesteps, text))
