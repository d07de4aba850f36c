"""The text-encoder entry the builder expects from configs alone: official defaults, and equal to the loaded one."""

import re
from pathlib import Path

import pytest
from transformers import Qwen2_5_VLConfig, UMT5Config

from longcat_dist.encoders import build_text_encoder
from longcat_dist.model.transformer import DiTConfig
from sharding.cli import _parser
from sharding.encode import EncoderSpec, text_encoder_info

# google/umt5-xxl, the text encoder of the official LongCat-Video checkpoint (its `text_encoder/config.json`).
UMT5_XXL = {"d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64, "vocab_size": 256384}  # fmt: skip


@pytest.mark.parametrize("layout", ["checkpoint root", "text encoder dir"])
def test_umt5_default_is_512_tokens_and_4096_wide(tmp_path: Path, layout: str):
    model_dir = tmp_path / "text_encoder"
    UMT5Config(**UMT5_XXL).save_pretrained(model_dir)  # the config only: no weights, nothing downloaded
    path = tmp_path if layout == "checkpoint root" else model_dir
    assert EncoderSpec().text_encoder_kind == "umt5"
    assert _parser().parse_args(["build"]).text_encoder == "umt5"
    info = text_encoder_info(EncoderSpec(text_encoder_path=str(path)))
    assert info == {"name": "umt5", "max_length": 512, "dim": 4096}
    assert info["dim"] == DiTConfig().caption_channels  # the width the official DiT's caption embedder takes


def test_qwen_width_comes_from_its_text_config(tmp_path: Path):
    Qwen2_5_VLConfig(text_config={"hidden_size": 3584}).save_pretrained(tmp_path)
    info = text_encoder_info(EncoderSpec(text_encoder_path=str(tmp_path), text_encoder_kind="qwen2.5-vl"))
    assert info == {"name": "qwen2.5-vl", "max_length": 512, "dim": 3584}


def test_a_text_encoder_dir_without_config_is_named(tmp_path: Path):
    expected = f"{tmp_path}: no config.json; expected a umt5 model directory"
    with pytest.raises(FileNotFoundError, match=re.escape(expected)):
        text_encoder_info(EncoderSpec(text_encoder_path=str(tmp_path)))


@pytest.mark.parametrize("kind", ["umt5", "qwen2.5-vl"])
def test_tiny_prediction_matches_the_loaded_encoder(kind: str):
    # The root guard compares the prediction with what the loaded encoder wrote into an earlier manifest.
    predicted = text_encoder_info(EncoderSpec(tiny=True, text_encoder_kind=kind))
    assert predicted == build_text_encoder(kind, tiny=True).info()
