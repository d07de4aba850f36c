"""`python -m launch.validate --config c.json --lora l.safetensors --start-frame s.png --prompt "..."`: a preview.

Samples one clip from a start frame and a prompt with a trained LoRA, without training and without Ray: the base
model, the VAE and the text encoder come from the config (tiny random ones with tiny_model). Writes
`<output>/validation/step_<k>/prompt.mp4`, a contact sheet, metrics.json and `<output>/index.html`.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from longcat_dist.config import ConfigError, load_config
from longcat_dist.validate.gallery import step_dir, write_gallery
from longcat_dist.validate.queue import ValidationRequest
from longcat_dist.validate.runner import ValidationRunner, settings_from_config

logger = logging.getLogger("launch.validate")

# Flags that set a config key (so load_config checks them like the file's values).
CONFIG_FLAGS = {
    "steps": "validation_num_inference_steps",
    "guidance": "validation_guidance",
    "frames": "validation_num_video_frames",
    "resolution": "validation_resolution",
    "negative_prompt": "validation_negative_prompt",
    "seed": "validation_seed",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m launch.validate", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the training config.json (model, VAE, defaults)")
    parser.add_argument(
        "--lora", help="LoRA .safetensors (PEFT/diffusers or official format); none: base model"
    )
    parser.add_argument("--start-frame", required=True, type=Path, help="image to animate (PNG or JPEG)")
    parser.add_argument("--prompt", required=True, help="what should happen in the clip")
    parser.add_argument("--output", type=Path, help="output folder (default: <output_dir>/preview)")
    parser.add_argument("--step", type=int, default=0, help="label of the step folder (default 0)")
    parser.add_argument("--steps", type=int, help="sampling steps (default: validation_num_inference_steps)")
    parser.add_argument(
        "--guidance", type=float, help="CFG scale (default: validation_guidance; 1 turns CFG off)"
    )
    parser.add_argument(
        "--frames", type=int, help="video frames, 4k + 1 (default: validation_num_video_frames)"
    )
    parser.add_argument("--resolution", help="HxW, e.g. 480x832 (default: validation_resolution)")
    parser.add_argument("--negative-prompt", help="negative prompt (default: validation_negative_prompt)")
    parser.add_argument("--seed", type=int, help="noise seed (default: validation_seed)")
    parser.add_argument("--verbose", action="store_true", help="log at INFO level")
    return parser


def _check_files(args: argparse.Namespace) -> str | None:
    if not args.start_frame.is_file():
        return f"--start-frame {args.start_frame}: file not found"
    if args.lora is not None and not Path(args.lora).is_file():
        return f"--lora {args.lora}: file not found (give the .safetensors written by training)"
    return None


def main(argv: list[str] | None = None) -> int:
    """CLI entry; returns the exit status (2 for bad input)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
    problem = _check_files(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    overrides = {
        key: getattr(args, flag) for flag, key in CONFIG_FLAGS.items() if getattr(args, flag) is not None
    }
    overrides |= {"validation_using_datasets": False, "validation_prompt": args.prompt,
                  "validation_start_frame": str(args.start_frame.resolve())}  # fmt: skip
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    output = (args.output or Path(cfg.output_dir) / "preview").resolve()
    settings = dataclasses.replace(settings_from_config(cfg), output_dir=output, tensorboard_dir=None)
    runner = ValidationRunner(settings, progress=True)
    report = runner.run(ValidationRequest(args.step, args.lora))
    runner.close()
    gallery = write_gallery(output)
    video = step_dir(output, args.step) / report["samples"][0]["video"]
    print(f"preview: {video}\ngallery: {gallery}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
