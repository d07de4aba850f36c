"""`python -m launch.demo --out demo_output`: the whole product on a laptop CPU in a few minutes.

Synthetic paired clips -> shards (tiny random VAE + tiny text encoder) -> a local Ray cluster -> 2 DeepSpeed ZeRO-2
workers (gloo) training LoRA on the tiny DiT -> LoRA files (both formats), metrics.jsonl and loss.png.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import threading
import time
from pathlib import Path

from tqdm import tqdm

from launch.train import JOB_NAMESPACE, run_training
from longcat_dist.config import TrainConfig, load_config
from longcat_dist.train.metrics import LOSS_PLOT_NAME, METRICS_NAME, read_metrics
from longcat_dist.train.records import WORKERS_DIR
from longcat_dist.train.worker import LORA_NAME, LORAS_DIR, OFFICIAL_LORA_NAME
from longcat_dist.validate.gallery import VALIDATION_DIR

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo" / "config.json"
DEMO_TRAIN_CLIPS = 24
SUMMARY_WINDOW = 20  # steps averaged at each end of the run for the loss summary


def build_demo_shards(data_dir: Path, train_clips: int = DEMO_TRAIN_CLIPS) -> Path:
    """Write the synthetic dataset and its shards (reused when already built); returns multidatabackend.json."""
    from sharding.cli import main as shards_main
    from sharding.demo_data import make_demo_data

    backends = data_dir / "multidatabackend.json"
    if not backends.is_file():
        make_demo_data(data_dir, train=train_clips)
    # The builder skips shards that are already complete, so a second demo run starts training at once.
    if shards_main(["build", "--config", str(backends), "--tiny", "--local"]) != 0:
        raise SystemExit("building the demo shards failed (see the error above)")
    return backends


def demo_config(out: Path, backends: Path, overrides: dict | None = None) -> TrainConfig:
    """configs/demo/config.json pointed at the demo data and at `out`."""
    paths = {"data_backend_config": str(backends), "output_dir": str(out), "storage_path": str(out / "ray")}
    return load_config(DEMO_CONFIG, {**paths, **(overrides or {})})


def clear_previous_run(cfg: TrainConfig) -> None:
    """Delete what an earlier demo wrote to the same place, except the data and shards: every demo starts over.

    Rerunning a job with the same storage_path and experiment_name resumes it (docs/TRAINING.md); for the demo that
    would resume a finished run and train nothing, so its checkpoints go, with the outputs made from them.
    """
    out = Path(cfg.output_dir)
    directories = [
        Path(cfg.storage_path) / cfg.experiment_name,
        out / LORAS_DIR,
        out / WORKERS_DIR,
        out / VALIDATION_DIR,
    ]
    if cfg.logging_dir is not None:
        directories.append(Path(cfg.logging_dir))  # TensorBoard would show the old curve next to the new one
    for directory in directories:
        shutil.rmtree(directory, ignore_errors=True)
    for name in (METRICS_NAME, LOSS_PLOT_NAME, LORA_NAME, OFFICIAL_LORA_NAME, "index.html"):
        (out / name).unlink(missing_ok=True)


def _follow(metrics: Path, total: int, done: threading.Event) -> None:
    """Show rank 0's progress from metrics.jsonl while the Ray job runs."""
    with tqdm(total=total, desc="train", unit="step") as bar:
        while not done.wait(1.0):
            rows = read_metrics(metrics) if metrics.is_file() else []
            if rows:
                bar.n = rows[-1]["step"]
                bar.set_postfix(loss=f"{rows[-1]['loss']:.4f}")
                bar.refresh()


def summarize(out: Path) -> tuple[float, float]:
    """Mean loss over the first and the last SUMMARY_WINDOW steps."""
    losses = [row["loss"] for row in read_metrics(out / METRICS_NAME)]
    window = max(1, min(SUMMARY_WINDOW, len(losses) // 2))
    return sum(losses[:window]) / window, sum(losses[-window:]) / window


def run_demo(
    out: Path, overrides: dict | None = None, num_cpus: int | None = None, train_clips: int = DEMO_TRAIN_CLIPS
) -> tuple[float, float]:
    """Data, shards, local Ray, training; returns (first, last) mean losses."""
    import ray

    out = out.resolve()
    started = time.perf_counter()
    print(f"[1/3] demo data and shards in {out / 'data'}")
    backends = build_demo_shards(out / "data", train_clips)
    cfg = demo_config(out, backends, overrides)
    print(
        f"[2/3] training: {cfg.num_workers} DeepSpeed ZeRO-{cfg.zero_stage} workers, {cfg.max_train_steps} steps"
    )
    clear_previous_run(cfg)
    ray.init(num_cpus=num_cpus, namespace=JOB_NAMESPACE, include_dashboard=False, log_to_driver=False)
    done = threading.Event()
    follower = threading.Thread(
        target=_follow, args=(out / METRICS_NAME, cfg.max_train_steps, done), daemon=True
    )
    follower.start()
    try:
        run_training(cfg)
    finally:
        done.set()
        follower.join()
        ray.shutdown()
    first, last = summarize(out)
    print(
        f"[3/3] loss {first:.4f} (first steps) -> {last:.4f} (last steps) in {time.perf_counter() - started:.0f} s"
    )
    print(
        f"LoRA: {out / 'lora.safetensors'} and {out / 'lora_official.safetensors'}; curve: {out / 'loss.png'}"
    )
    return first, last


def main(argv: list[str] | None = None) -> int:
    """CLI entry (`make demo`)."""
    parser = argparse.ArgumentParser(prog="python -m launch.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("demo_output"), help="where everything is written")
    parser.add_argument("--steps", type=int, help="override max_train_steps")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
    # The demo asks for 2 workers x 1 CPU; a laptop with fewer cores still runs them (Ray CPUs are logical).
    run_demo(args.out, {"max_train_steps": args.steps} if args.steps else None, num_cpus=4)
    return 0


if __name__ == "__main__":
    sys.exit(main())
