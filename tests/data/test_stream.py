"""Streaming shards: disjoint rank/worker splits, equal steps per rank, one bucket per batch, resume, pipe: and s3:// URLs."""

import os
from collections import Counter

import pytest

from longcat_dist.data import stream

SEED = 3


def _sources(root, url_root=None):
    manifest = stream.read_manifest(url_root or root)
    return stream.dataset_sources(url_root or root, manifest), stream.ShardDecoder([manifest])


def _batches(root, *, rank, world_size, num_workers, batch_size=2, epoch=0, start_step=0, url_root=None):
    sources, decoder = _sources(root, url_root)
    plan, batches = stream.rank_batches(
        sources, rank=rank, world_size=world_size, num_workers=num_workers, batch_size=batch_size,
        shuffle_buffer=4, seed=SEED, epoch=epoch, start_step=start_step, decode=decoder,
    )  # fmt: skip
    return plan, list(batches)


def test_ranks_and_workers_read_disjoint_samples_in_equal_steps(uneven_shards):
    seen, steps = Counter(), []
    for rank in range(2):
        plan, batches = _batches(uneven_shards, rank=rank, world_size=2, num_workers=2, batch_size=1)
        steps.append(len(batches))
        for batch in batches:
            # video[0, 0, 0, 0] holds the sample's index: the key and the tensor travel together.
            assert all(k == f"uneven/s{int(v[0, 0, 0, 0]):05d}" for k, v in zip(batch.keys, batch.video))
            seen.update(batch.keys)
    assert steps[0] == steps[1] == plan.steps_per_rank > 0
    assert max(seen.values()) == 1  # no sample twice within the epoch
    assert len(seen) + plan.dropped_samples == 15


def test_batches_hold_one_bucket_and_padded_shapes(uneven_shards):
    plan, batches = _batches(uneven_shards, rank=0, world_size=1, num_workers=0, batch_size=2)
    assert len(batches) == plan.steps_per_rank == 7  # 7 of the 15 samples' pairs; one sample dropped
    assert plan.dropped_samples == 1
    groups = Counter(b.group for b in batches)
    assert set(groups) == {"uneven/16x16x5", "uneven/16x32x1"}
    for batch in batches:
        assert batch.video.shape[2:] == ((2, 2, 2) if batch.group.endswith("x5") else (1, 2, 4))
        assert batch.video.shape[:2] == (2, 16) and batch.cond.shape[2] == 1
        assert [t.shape[1] for t in batch.texts] == [8, 8]


def test_plan_is_deterministic_and_changes_with_epoch(uneven_shards):
    sources, _ = _sources(uneven_shards)
    kw = dict(world_size=2, num_workers=1, batch_size=1, seed=SEED)
    assert stream.plan_epoch(sources, epoch=0, **kw) == stream.plan_epoch(sources, epoch=0, **kw)
    orders = {stream.plan_epoch(sources, epoch=e, **kw).streams[0].order for e in range(6)}
    assert len(orders) > 1


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_continues_where_the_stream_stopped(uneven_shards, num_workers):
    _, full = _batches(uneven_shards, rank=1, world_size=2, num_workers=num_workers, batch_size=1)
    _, tail = _batches(
        uneven_shards, rank=1, world_size=2, num_workers=num_workers, batch_size=1, start_step=3
    )
    assert [b.keys for b in tail] == [b.keys for b in full[3:]]


def test_pipe_url_reads_the_same_batches(uneven_shards):
    _, local = _batches(uneven_shards, rank=0, world_size=1, num_workers=0)
    _, piped = _batches(
        uneven_shards, rank=0, world_size=1, num_workers=0, url_root=f"pipe:cat {uneven_shards}/{{path}}"
    )
    assert [b.keys for b in piped] == [b.keys for b in local]
    assert stream.read_null_text(f"pipe:cat {uneven_shards}/{{path}}").shape == (1, 8)


def test_clear_errors_for_too_little_data_and_count_mismatch(uneven_shards, tmp_path):
    sources, decoder = _sources(uneven_shards)
    with pytest.raises(ValueError, match="too few"):
        stream.plan_epoch(sources, world_size=8, num_workers=2, batch_size=4, seed=0, epoch=0)
    lying = [stream.ShardSource(s.group, s.url, s.num_samples + 1) for s in sources]
    with pytest.raises(ValueError, match="manifest says"):
        list(stream.rank_batches(
            lying, rank=0, world_size=1, num_workers=0, batch_size=1, shuffle_buffer=0, seed=0, epoch=0,
            start_step=0, decode=decoder,
        )[1])  # fmt: skip
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        stream.read_manifest(tmp_path)


def test_stream_position_round_trips():
    pos = stream.StreamPosition(epoch=2, step_in_epoch=5, world_size=2, num_workers=1, batch_size=1, seed=4)
    assert stream.StreamPosition.from_dict(pos.to_dict()) == pos


def test_s3_url_reads_the_same_batches_through_the_aws_cli(uneven_shards, tmp_path, monkeypatch):
    # No object store here: an `aws` on PATH that serves `aws s3 cp s3://bucket/<key> -` from the shard folder
    # stands in for the CLI, so the test covers our URL building and WebDataset's pipe reading of it.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.txt"
    aws = bin_dir / "aws"
    aws.write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> "{calls}"\n'
        '[ "$1 $2 $4" = "s3 cp -" ] || { echo "unexpected: $*" >&2; exit 2; }\n'
        f'exec cat "{uneven_shards}/${{3#s3://bucket/prefix/}}"\n'
    )
    aws.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    _, local = _batches(uneven_shards, rank=0, world_size=1, num_workers=0)
    _, remote = _batches(uneven_shards, rank=0, world_size=1, num_workers=0, url_root="s3://bucket/prefix/")
    assert [b.keys for b in remote] == [b.keys for b in local]
    requested = calls.read_text().splitlines()
    assert requested[0] == "s3 cp s3://bucket/prefix/manifest.json -"
    assert any(line.endswith(".tar -") for line in requested)
