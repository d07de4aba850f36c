"""bench/scaling.py on CPU workers with gloo: the scaling table, rank agreement, the 1-worker check, a kill/resume."""

import importlib.util
import math
import re
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"

pytestmark = pytest.mark.integration


def _load():
    spec = importlib.util.spec_from_file_location("scaling", BENCH / "scaling.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pixel_size_inverts_the_vae_shape():
    scaling = _load()
    assert scaling.pixel_size((24, 60, 104)) == (93, 480, 832)
    assert scaling.pixel_size((2, 2, 2)) == (5, 16, 16)


def test_kill_step_outside_the_run_is_refused(capsys):
    scaling = _load()
    with pytest.raises(SystemExit):
        scaling.parse_args(["--steps", "2", "--warmup", "1", "--kill-at", "3"])
    assert "--kill-at 3: must lie inside the run's 3 steps" in capsys.readouterr().err


def test_cpu_smoke_run_prints_the_table_and_checks_the_ranks(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["scaling.py"])
    scaling = _load()
    # lr 1e-2 with adam_epsilon 1e-3 keeps Adam's update proportional to the gradient, so the 2-worker and the
    # 1-worker x 2-accumulation LoRAs differ only by the rounding of the all-reduce (tests/train/test_equivalence.py).
    rows = scaling.main(["--cpu", "--workers", "1,2", "--zero", "2", "--latent", "2,2,2", "--steps", "2",
                         "--warmup", "1", "--equivalence", "--kill-at", "2", "--checkpoint-every", "1",
                         "--out", str(tmp_path), "--set", "learning_rate=0.01", "adam_epsilon=0.001"])  # fmt: skip
    out = capsys.readouterr().out
    one, two, killed = rows
    assert (one["workers"], two["workers"], killed["workers"]) == (1, 2, 2)
    assert one["steps"] == two["steps"] == killed["steps"] == 3
    assert one["efficiency"] == pytest.approx(1.0)
    assert two["efficiency"] == pytest.approx(two["samples_per_s"] / (2 * one["samples_per_s"]))
    for row in rows:
        assert row["samples_per_s"] > 0 and row["step_s"] > 0 and row["data_wait_s"] >= 0
        assert row["ranks_agree"], row
        assert row["ranks"] == row["workers"]
    # The comms logger saw DeepSpeed's gradient collectives in the 2-worker run.
    assert two["comm_s"] > 0
    assert math.isnan(two["peak_gib"])  # CPU: no GPU memory to report
    assert two["vs_1_worker"] <= 1e-5
    # Rank 0 died at step 2 after the checkpoint of step 1... or of step 2: the group resumed from a checkpoint.
    assert killed["resumed_from"] in (1, 2)
    assert killed["vs_uninterrupted"] <= 1e-5
    assert (tmp_path / "zero2-n2-kill2" / "killed").read_text() == "2"
    lines = out.splitlines()
    assert lines[1].split()[:4] == ["ZeRO", "GPUs", "samples/s", "s/step"]
    table = [line.split() for line in lines if re.match(r"\d+ +\d+ ", line)]  # Ray's own messages share stdout
    assert [row[:2] for row in table] == [["2", "1"], ["2", "2"], ["2", "2"]]
    assert table[0][4] == "100.0%" and table[1][8] == "yes" and table[2][4] == "-"
    assert "killed rank 0 at step 2: resumed from step" in out
