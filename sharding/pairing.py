"""Pair each clip with its start frame (same stem) and its caption; list what cannot be paired and why."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

VIDEO_EXTS = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_KEY_SAFE = re.compile(r"[^A-Za-z0-9_\-]")


@dataclass(frozen=True)
class Pair:
    """One training example before decoding: a clip, its start frame and its caption."""

    key: str  # the sample key in the shards: letters, digits, '_' and '-' only
    clip: Path
    start_frame: Path
    caption: str


@dataclass
class Pairing:
    """Pairs found, every clip left out with its reason, and start frames that no clip uses."""

    pairs: list[Pair] = field(default_factory=list)
    unpaired: list[tuple[str, str]] = field(default_factory=list)  # (clip stem, reason)
    orphan_frames: list[str] = field(
        default_factory=list
    )  # start frames with no clip: counted, never an error


class PairingError(ValueError):
    """Inputs that cannot be paired: duplicate stems, or unpaired clips without --skip-unpaired."""


def sample_key(stem: str) -> str:
    """A shard sample key from a relative stem ("sub/clip 1" -> "sub_clip_1-<hash>"); plain stems stay as they are."""
    if not _KEY_SAFE.search(stem):
        return stem
    # Replacing characters could make two stems collide, so a short hash of the original keeps keys unique.
    return f"{_KEY_SAFE.sub('_', stem)}-{hashlib.sha1(stem.encode('utf-8')).hexdigest()[:8]}"


def _files_by_stem(root: Path, exts: tuple[str, ...], what: str) -> dict[str, Path]:
    """Files under root with one of exts, keyed by their path relative to root without the suffix."""
    if not root.is_dir():
        raise PairingError(f"{what} directory {root} does not exist")
    found: dict[str, Path] = {}
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() not in exts or not path.is_file():
            continue
        stem = path.relative_to(root).with_suffix("").as_posix()
        if stem in found:
            raise PairingError(f"{what} {found[stem]} and {path} share the stem {stem!r}; keep one of them")
        found[stem] = path
    return found


def _caption(clip: Path, stem: str, strategy: str, instance_prompt: str | None) -> str | None:
    if strategy == "textfile":
        path = clip.with_suffix(".txt")
        return path.read_text(encoding="utf-8").strip() if path.is_file() else None
    if strategy == "filename":
        return Path(stem).name.replace("_", " ").strip()
    if strategy == "instanceprompt":
        return instance_prompt
    raise PairingError(f"caption_strategy {strategy!r}: use textfile, filename or instanceprompt")


def pair_clips(
    clip_dir: Path,
    start_frame_dir: Path,
    *,
    caption_strategy: str = "textfile",
    instance_prompt: str | None = None,
) -> Pairing:
    """Match clips to start frames by relative stem and read captions; unmatched clips go to `unpaired`."""
    clips = _files_by_stem(clip_dir, VIDEO_EXTS, "clip")
    frames = _files_by_stem(start_frame_dir, IMAGE_EXTS, "start frame")
    result = Pairing()
    keys: dict[str, str] = {}
    for stem, clip in clips.items():
        caption = _caption(clip, stem, caption_strategy, instance_prompt)
        missing = [
            what for what, ok in (("start frame", stem in frames), ("caption", bool(caption))) if not ok
        ]
        if missing:
            result.unpaired.append((stem, f"no {' and no '.join(missing)}"))
            continue
        key = sample_key(stem)
        if key in keys:
            raise PairingError(
                f"clips {keys[key]!r} and {stem!r} map to the same sample key {key!r}; rename one"
            )
        keys[key] = stem
        result.pairs.append(Pair(key, clip, frames[stem], caption))
    result.orphan_frames = sorted(set(frames) - set(clips))
    return result


def require_paired(pairing: Pairing, dataset_id: str, skip_unpaired: bool) -> None:
    """Raise listing every unpaired stem unless skipping was asked for."""
    if pairing.unpaired and not skip_unpaired:
        listing = "\n".join(f"  {stem}: {reason}" for stem, reason in pairing.unpaired)
        raise PairingError(
            f"dataset {dataset_id}: {len(pairing.unpaired)} inputs cannot be paired:\n{listing}\n"
            "add the missing start frames (same stem, in the conditioning dataset) or captions (<clip>.txt), "
            "or pass --skip-unpaired to leave them out"
        )
