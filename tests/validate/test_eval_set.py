"""Reading the eval split from its shards: order, limit, and errors that name the file."""

import pytest
import torch
from validate_helpers import FRAMES, SIZE, TEXT_DIM, write_clip_shards

from longcat_dist.data import format as fmt
from longcat_dist.validate.eval_set import read_eval_split


def _clips(count):
    gen = torch.Generator().manual_seed(0)
    videos = [torch.randn(fmt.latent_shape(FRAMES, SIZE, SIZE), generator=gen) for _ in range(count)]
    texts = [torch.randn(1 + i, TEXT_DIM, generator=gen) for i in range(count)]
    return videos, texts


def test_reads_samples_in_shard_order_up_to_the_limit(tmp_path):
    videos, texts = _clips(5)
    write_clip_shards(tmp_path, videos, texts)
    items, null_text, manifest = read_eval_split(tmp_path, limit=3)
    assert [i.key for i in items] == ["clip0", "clip1", "clip2"] and manifest.total_samples == 5
    assert items[1].caption == "clip 1" and items[1].text.shape == (2, TEXT_DIM)
    assert torch.equal(items[2].truth, videos[2].to(torch.bfloat16))
    assert torch.equal(items[2].cond_latents, videos[2][:, :1].to(torch.bfloat16))
    assert null_text.shape == (1, TEXT_DIM)


def test_a_missing_shard_names_its_path(tmp_path):
    write_clip_shards(tmp_path, *_clips(1))
    shard = next(tmp_path.rglob("*.tar"))
    shard.unlink()
    with pytest.raises(fmt.ShardFormatError, match=f"{shard.name}: listed in .*manifest.json but missing"):
        read_eval_split(tmp_path)
