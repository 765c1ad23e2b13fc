"""Where the project keeps its files."""
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DATA_DIR = REPO_ROOT / "data"
MODELS_DIR = DATA_DIR / "models"  # generated checkpoints and low-bit caches; ignored by git
TRAINED_MODEL_DIR = MODELS_DIR / "rwkv-4-world-shakespeare"  # the model trained here, built by `make checkpoint`
HELD_OUT_TEXT = DATA_DIR / "heldout" / "tempest.txt"  # The Tempest, never trained on: what quality is measured on
