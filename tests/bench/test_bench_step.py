"""bench/step.py: the launches a bench/attention.py sweep picked reach the BSA kernels' tables."""

import importlib.util
import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_bsa_launch_from_an_attention_sweep_sets_the_kernel_tables(tmp_path, monkeypatch):
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("bench_step", BENCH / "step.py")
    step = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(step)
    from longcat_dist.kernels import bsa_triton

    for table in ("FWD_LAUNCH", "DQ_LAUNCH", "DKDV_LAUNCH"):
        monkeypatch.setitem(getattr(bsa_triton, table), 128, getattr(bsa_triton, table)[128])
    picked = {"FWD_LAUNCH": [64, 4, 1, 128], "DQ_LAUNCH": [64, 4, 3, None], "DKDV_LAUNCH": [64, 4, 2, 168]}
    results = tmp_path / "results.json"
    results.write_text(json.dumps([{"shape": "train", "launch": picked}, {"shape": "704x24", "launch": {}}]))
    step.apply_bsa_launch(results)
    for table, values in picked.items():
        assert getattr(bsa_triton, table)[128] == bsa_triton.Launch(*values)
