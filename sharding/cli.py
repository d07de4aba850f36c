"""`longcat-shards`: build, verify and inspect shard roots; generate the demo dataset."""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from pathlib import Path

from longcat_dist.config_values import ConfigError
from longcat_dist.data.format import ShardFormatError
from sharding.build import BuildError, BuildOptions, DatasetSpec, build_dataset, check_dataset_root
from sharding.encode import TEXT_ENCODER_KINDS, EncoderSpec
from sharding.media import MediaError
from sharding.output_root import OutputRootError
from sharding.pairing import PairingError

USER_ERRORS = (
    ConfigError,
    BuildError,
    OutputRootError,
    PairingError,
    ShardFormatError,
    MediaError,
    FileNotFoundError,
    KeyError,
)


def _encoder_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint-root", type=Path, help="official LongCat-Video dir (vae/, text_encoder/, ...)"
    )
    parser.add_argument("--vae-path", type=Path, help="a diffusers AutoencoderKLWan dir (overrides the root)")
    parser.add_argument("--tiny", action="store_true", help="tiny random encoders (tests and the demo)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="longcat-shards", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="encode clips + start frames + captions into shards")
    build.add_argument(
        "--config", type=Path, help="multidatabackend.json: builds every enabled video dataset"
    )
    build.add_argument("--clips", type=Path)
    build.add_argument("--start-frames", type=Path)
    build.add_argument("--out", type=Path)
    build.add_argument("--dataset-id")
    build.add_argument(
        "--caption-strategy", default="textfile", choices=("textfile", "filename", "instanceprompt")
    )
    build.add_argument("--instance-prompt")
    build.add_argument("--resolution", type=int, default=480, help="bucket short side, pixels")
    build.add_argument("--frames", type=int, default=93, help="frames per clip; (frames - 1) % 4 == 0")
    build.add_argument("--min-frames", type=int, help="shortest clip kept (default: --frames)")
    build.add_argument("--alignment", type=int, default=64, help="bucket long side multiple")
    _encoder_args(build)
    build.add_argument(
        "--text-encoder-path", type=Path, help="umT5 dir with its tokenizer (overrides the root)"
    )
    build.add_argument("--text-encoder", default="umt5", choices=TEXT_ENCODER_KINDS)
    build.add_argument("--samples-per-shard", type=int, default=64)
    build.add_argument(
        "--skip-unpaired", action="store_true", help="leave out clips lacking a start frame/caption"
    )
    build.add_argument("--num-encode-workers", type=int, default=1, help="Ray Data encode actors")
    build.add_argument("--local", action="store_true", help="run in this process instead of through Ray Data")
    verify = sub.add_parser("verify", help="re-read every shard and check it against the manifest")
    verify.add_argument("root", type=Path)
    inspect = sub.add_parser("inspect", help="per-bucket statistics; --sample KEY renders one sample")
    inspect.add_argument("root", type=Path)
    inspect.add_argument("--sample", help="decode this sample's latents to an MP4 and a PNG contact sheet")
    inspect.add_argument("--out", type=Path, default=Path("."), help="where --sample writes its files")
    _encoder_args(inspect)
    demo = sub.add_parser(
        "demo-data", help="write a small synthetic paired dataset and its multidatabackend.json"
    )
    demo.add_argument("dir", type=Path)
    demo.add_argument("--train", type=int, default=24)
    demo.add_argument("--val", type=int, default=4)
    demo.add_argument("--seed", type=int, default=0)
    return parser


def _datasets(args: argparse.Namespace) -> list[DatasetSpec]:
    """The datasets to build, from --config or from the flag form."""
    if args.config is None:
        missing = [f for f in ("clips", "start_frames", "out", "dataset_id") if getattr(args, f) is None]
        if missing:
            flags = ", ".join("--" + m.replace("_", "-") for m in missing)
            raise ConfigError("command line", "", None, f"build needs --config or all of {flags}")
        return [DatasetSpec(args.dataset_id, args.clips, args.start_frames, args.out, args.caption_strategy,
                            args.instance_prompt, args.resolution, args.frames, args.min_frames, args.alignment)]  # fmt: skip
    from longcat_dist.config_data import load_data_backends

    path = args.config
    raw = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    if isinstance(raw, dict) and "data_backend_config" in raw:  # a training config.json: follow its pointer
        path = (path.parent / raw["data_backend_config"]).resolve()
    by_id = {d.id: d for d in load_data_backends(path)}
    specs = []
    for ds in by_id.values():
        if ds.dataset_type != "video" or ds.disabled:
            continue
        if isinstance(ds.cache_dir_vae, str):
            raise ConfigError(
                path, f"{ds.id}.cache_dir_vae", ds.cache_dir_vae,
                "the shard builder writes to a local or mounted directory",
                "build there, then copy the shard root to object storage and point training at the URL",
            )  # fmt: skip
        start = by_id[ds.conditioning_data[0]]
        specs.append(DatasetSpec(ds.id, ds.instance_data_dir, start.instance_data_dir, ds.cache_dir_vae,
                                 ds.caption_strategy, ds.instance_prompt, ds.resolution or args.resolution,
                                 ds.num_frames or args.frames, ds.min_frames, args.alignment))  # fmt: skip
    return specs


def _encoder_spec(args: argparse.Namespace, text: bool = True) -> EncoderSpec:
    root = args.checkpoint_root
    vae = args.vae_path or root
    text_path = (args.text_encoder_path or root) if text else None
    if not args.tiny and vae is None:
        raise ConfigError("command line", "--vae-path", None, "give --checkpoint-root, --vae-path or --tiny")
    if text and not args.tiny and text_path is None:
        rule = "give --checkpoint-root, --text-encoder-path or --tiny"
        raise ConfigError("command line", "--text-encoder-path", None, rule)
    return EncoderSpec(tiny=args.tiny, vae_path=None if vae is None else str(vae),
                       text_encoder_path=None if text_path is None else str(text_path),
                       text_encoder_kind=getattr(args, "text_encoder", "umt5"), device=args.device)  # fmt: skip


def _build(args: argparse.Namespace) -> int:
    datasets = _datasets(args)
    options = BuildOptions(_encoder_spec(args), args.samples_per_shard, args.skip_unpaired,
                           args.num_encode_workers, use_ray=not args.local)  # fmt: skip
    for dataset in datasets:  # refuse a wrong root before any dataset is built
        check_dataset_root(dataset, options.encoders)
    started_ray = False
    if options.use_ray:
        import ray

        if not ray.is_initialized():
            ray.init(include_dashboard=False, log_to_driver=args.verbose, configure_logging=False)
            started_ray = True
    try:
        for dataset in datasets:
            print(build_dataset(dataset, options).describe())
    finally:
        if started_ray:
            ray.shutdown()
    return 0


def _verify(args: argparse.Namespace) -> int:
    from sharding.verify import verify

    problems = verify(args.root)
    if problems:
        print(f"{args.root}: {len(problems)} problems", file=sys.stderr)
        for line in problems:
            print(f"  {line}", file=sys.stderr)
        return 1
    print(f"{args.root}: all shards match the manifest")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from sharding.verify import find_sample, inspect, render_sample

    print(inspect(args.root))
    if args.sample:
        from longcat_dist.encoders import build_vae

        spec = _encoder_spec(args, text=False)
        _, sample = find_sample(args.root, args.sample)
        mp4, png = render_sample(
            build_vae(spec.vae_path, tiny=spec.tiny, device=spec.device), sample, args.out
        )
        print(f"wrote {mp4} and {png}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from sharding.demo_data import make_demo_data

    config = make_demo_data(args.dir, train=args.train, val=args.val, seed=args.seed)
    # --local: the tiny encoders build the demo in seconds in-process; Ray start-up alone takes longer.
    command = f"longcat-shards build --config {shlex.quote(str(config))} --tiny --local"
    print(f"wrote {args.train} train + {args.val} val clips; build with: {command}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `longcat-shards` console script."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
    commands = {"build": _build, "verify": _verify, "inspect": _inspect, "demo-data": _demo}
    try:
        return commands[args.command](args)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
