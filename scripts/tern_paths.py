"""Where tern's scripts find things: the repository root and the model cache
($TERN_CACHE, default ~/.cache/tern; the same rule as tern::fs::cache_dir in Rust)."""
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("TERN_CACHE", Path.home() / ".cache" / "tern"))
