"""Session-wide test settings: quiet, deterministic, CPU-only."""

import os

# Keep every library on the CPU path and quiet; tests that need more set it themselves.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
