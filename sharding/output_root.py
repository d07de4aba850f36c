"""The output root's guard: a build resumes only into a root that was built the same way.

A root's manifest records how it was built: the dataset id, the VAE (class and config hash), the text encoder
(name, max_length, dim) and the build parameters (resolution, frames, min_frames, alignment, captions). A build
whose own record differs in any of these fields would mix two kinds of samples in one root, or silently replace the
old ones, so it is refused before anything under the root changes.
"""

from __future__ import annotations

import logging
from pathlib import Path

from longcat_dist.data.format import Manifest, ShardFormatError

logger = logging.getLogger(__name__)

VAE_FIELDS = ("class", "config_hash")  # latents_mean/std come from the config, so its hash covers them
TEXT_ENCODER_FIELDS = ("name", "max_length", "dim")


class OutputRootError(ValueError):
    """An output root that holds shards this build must not resume or overwrite."""


def root_fingerprint(dataset_id: str, vae: dict, text_encoder: dict, build: dict) -> dict[str, object]:
    """What must match for a build to resume into a root, as {dotted field name: value}."""
    fields: dict[str, object] = {"dataset_id": dataset_id}
    fields.update({f"vae.{key}": vae.get(key) for key in VAE_FIELDS})
    fields.update({f"text_encoder.{key}": text_encoder.get(key) for key in TEXT_ENCODER_FIELDS})
    fields.update({f"build.{key}": value for key, value in build.items()})
    return fields


def manifest_fingerprint(manifest: Manifest) -> dict[str, object]:
    """The fingerprint a manifest records; fields it does not record are absent."""
    return root_fingerprint(manifest.dataset_id, manifest.vae, manifest.text_encoder, manifest.build)


def fingerprint_differences(recorded: dict, wanted: dict) -> list[tuple[str, object, object]]:
    """(field, recorded value, wanted value) for every field both record with different values."""
    return [(name, recorded[name], value) for name, value in wanted.items()
            if name in recorded and recorded[name] != value]  # fmt: skip


def check_output_root(root: Path, wanted: dict[str, object]) -> None:
    """Refuse a root whose manifest records another fingerprint than `wanted`; changes nothing on disk."""
    if not (root / "manifest.json").exists():
        return
    try:
        recorded = manifest_fingerprint(Manifest.load(root))
    except ShardFormatError as err:
        raise OutputRootError(
            f"{root} holds a manifest this build cannot read ({err}); build into another --out "
            "(cache_dir_vae) or delete that directory to rebuild it"
        ) from err
    unrecorded = sorted(name for name in wanted if name not in recorded)
    if unrecorded:
        # Manifests written before the build parameters were recorded: resume on what they do record.
        logger.warning("%s: its manifest does not record %s; not checked before resuming", root, unrecorded)
    differences = fingerprint_differences(recorded, wanted)
    if differences:
        listed = "; ".join(
            f"{name} is {old!r} there, {new!r} in this build" for name, old, new in differences
        )
        raise OutputRootError(
            f"{root} already holds a different manifest: {listed}. Build into another --out (cache_dir_vae), "
            f"or delete {root} to rebuild it this way"
        )


def remove_leftover_temp_files(root: Path) -> list[Path]:
    """Delete the temp files (`.<name>.<pid>.tmp`) a killed build left under root; returns them."""
    leftovers = sorted(root.glob("**/.*.tmp"))
    for leftover in leftovers:
        logger.info("removing %s, left by an interrupted build", leftover)
        leftover.unlink()
    return leftovers
