"""Pairing clips, start frames and captions by stem."""

from pathlib import Path

import pytest

from sharding.pairing import PairingError, pair_clips, require_paired, sample_key


def _touch(path: Path, text: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    clips, frames = tmp_path / "clips", tmp_path / "frames"
    for stem in ("a", "b", "sub/c d"):
        _touch(clips / f"{stem}.mp4")
        _touch(clips / f"{stem}.txt", f"caption of {stem}\n")
        _touch(frames / f"{stem}.png")
    return clips, frames


def test_pairs_by_relative_stem(dirs):
    pairing = pair_clips(*dirs)
    assert [p.caption for p in pairing.pairs] == ["caption of a", "caption of b", "caption of sub/c d"]
    assert [p.start_frame.name for p in pairing.pairs] == ["a.png", "b.png", "c d.png"]
    assert pairing.unpaired == [] and pairing.orphan_frames == []
    assert pairing.pairs[2].key == sample_key("sub/c d") and "/" not in pairing.pairs[2].key


def test_unpaired_clips_are_listed_or_skipped(dirs):
    clips, frames = dirs
    (frames / "a.png").unlink()
    (clips / "b.txt").unlink()
    _touch(clips / "e.mp4")
    _touch(frames / "orphan.jpg")
    pairing = pair_clips(clips, frames)
    assert [p.key for p in pairing.pairs] == [sample_key("sub/c d")]
    assert pairing.unpaired == [
        ("a", "no start frame"),
        ("b", "no caption"),
        ("e", "no start frame and no caption"),
    ]
    assert pairing.orphan_frames == ["orphan"]
    with pytest.raises(
        PairingError, match=r"(?s)3 inputs cannot be paired.*a: no start frame.*--skip-unpaired"
    ):
        require_paired(pairing, "clips", skip_unpaired=False)
    require_paired(pairing, "clips", skip_unpaired=True)


def test_caption_strategies(dirs):
    clips, frames = dirs
    _touch(clips / "red_square_left.mp4")
    _touch(frames / "red_square_left.png")
    by_name = {p.key: p.caption for p in pair_clips(clips, frames, caption_strategy="filename").pairs}
    assert by_name["red_square_left"] == "red square left"
    fixed = pair_clips(clips, frames, caption_strategy="instanceprompt", instance_prompt="sks clip").pairs
    assert {p.caption for p in fixed} == {"sks clip"}


def test_duplicate_stems_and_missing_dirs_are_errors(dirs, tmp_path: Path):
    clips, frames = dirs
    _touch(clips / "a.mov")
    with pytest.raises(PairingError, match="share the stem 'a'"):
        pair_clips(clips, frames)
    with pytest.raises(PairingError, match="does not exist"):
        pair_clips(tmp_path / "nope", frames)


def test_sample_keys_are_safe_and_distinct():
    assert sample_key("clip_01") == "clip_01"
    assert sample_key("a b") != sample_key("a_b") and sample_key("a b").startswith("a_b-")
    assert "." not in sample_key("x.y")
