"""The `longcat-shards` command line: what it tells the user to run next."""

import shlex
from pathlib import Path

from longcat_dist.data.format import Manifest
from sharding.cli import _parser, main
from sharding.demo_data import TRAIN_ID, VAL_ID


def test_demo_data_prints_the_fast_build_command_and_it_works(tmp_path: Path, capsys):
    out = tmp_path / "demo data"  # a space: the printed command must quote the path
    assert main(["demo-data", str(out), "--train", "2", "--val", "1"]) == 0
    command = capsys.readouterr().out.split("build with: ", 1)[1].strip()
    words = shlex.split(command)
    assert words[:2] == ["longcat-shards", "build"]
    args = _parser().parse_args(words[1:])
    # --local: in-process, seconds; without it the Ray Data path starts Ray first and takes minutes.
    assert args.local and args.tiny and args.config == out / "multidatabackend.json"
    assert main(words[1:]) == 0
    assert Manifest.load(out / "cache" / TRAIN_ID).total_samples == 2
    assert Manifest.load(out / "cache" / VAL_ID).total_samples == 1
