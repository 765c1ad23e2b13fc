"""Which model to load: the model trained here (the default), a local folder, or a Hugging Face hub id."""
import json
import re
from dataclasses import dataclass
from pathlib import Path

from helpers.runtime import settings
from helpers.runtime.errors import UserError
from helpers.runtime.paths import REPO_ROOT, TRAINED_MODEL_DIR
from helpers.runtime.checkpoint_files import checkpoint_files

# The real RWKV-4 World models on the Hugging Face hub, with their fp16 download size in GB.
HUB_MODELS = {
    "RWKV/rwkv-4-world-169m": 0.34,
    "RWKV/rwkv-4-world-430m": 0.92,
    "RWKV/rwkv-4-world-1b5": 3.1,
    "RWKV/rwkv-4-world-3b": 6.1,
    "RWKV/rwkv-4-world-7b": 15.0,
}
# The files of a hub model that loading it needs (the hub repos also hold READMEs, images and so on).
HUB_FILE_PATTERNS = ["*.json", "*.safetensors", "*.bin", "*.py", "*.txt", "*.model"]
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class ModelSource:
    """What to pass to from_pretrained, with the model's config already read and checked."""

    location: str  # a local folder: the one given, or a hub model's snapshot in the Hugging Face cache
    config: dict
    offline: bool  # True for the project's random-weight checkpoints
    name: str  # the folder's name, or the hub id with "--" for "/"

    @property
    def trained_here(self):
        return "trained_here" in self.config

    def producer(self):
        """One line on what produced this model's text, to show beside it."""
        if self.offline:
            return f"{self.name}: random weights, the text is meaningless"
        if self.trained_here:
            layers, hidden = self.config["num_hidden_layers"], self.config["hidden_size"]
            return (f"{self.name}: a small RWKV-4 ({layers} layers, {hidden} wide) trained here on Shakespeare's "
                    "works, not the 7B")
        return self.name


def _read_config(config_file, label):
    try:
        config = json.loads(Path(config_file).read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"{label} has no readable config.json ({error}); is it a Hugging Face model folder?")
    if config.get("model_type") != "rwkv":
        raise UserError(
            f"{label} is a {config.get('model_type', 'unknown')!r} model, not RWKV-4 (model_type 'rwkv'). "
            "Pick an RWKV-4 model such as RWKV/rwkv-4-world-7b, or leave the model out for the model trained here."
        )
    return config


def _hub_snapshot(repo_id):
    """The local folder of a hub model: its snapshot in the Hugging Face cache, downloaded first if missing."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILE_PATTERNS))  # the cache alone when offline
    except Exception:
        raise UserError(
            f"{repo_id} is neither in the local Hugging Face cache nor reachable. Fetch it once where there "
            f"is internet (`huggingface-cli download {repo_id}`, then copy ~/.cache/huggingface here), or pass "
            "a local folder. The model trained here needs nothing: leave the model out."
        ) from None


def resolve_model(name_or_path=None):
    """A ModelSource for a local folder (relative: from the working folder, else from the project's root), a hub
    id, or (None / empty: RWKV_MODEL's, else) the model trained here. Builds nothing: the trained model's
    checkpoint is made by `make checkpoint`."""
    name_or_path = (name_or_path or settings.read().model or "").strip()
    if not name_or_path:
        if not (TRAINED_MODEL_DIR / "config.json").exists():
            raise UserError(f"The model trained here has no checkpoint in {TRAINED_MODEL_DIR} yet: run `make checkpoint` "
                            "(or `python -m helpers.tools.checkpoint --trained`), or pass a model.")
        return _folder_source(TRAINED_MODEL_DIR)
    path = _local_path(name_or_path)
    if path.is_dir():
        return _folder_source(path)
    if path.exists():
        raise UserError(f"{path} is a file; pass the folder that holds config.json and the weights.")
    if HUB_ID.match(name_or_path) and not name_or_path.startswith("."):
        return _folder_source(_hub_snapshot(name_or_path), name=name_or_path.replace("/", "--"))
    raise UserError(
        f"No model folder at {path}. Pass an existing folder, a hub id such as RWKV/rwkv-4-world-7b, "
        "or leave the model out to use the model trained here."
    )


def _local_path(name):
    """The absolute path `name` names: from the working folder or, where a relative one is not found there, from
    the project's root, where `make` runs (a notebook's kernel runs in notebooks/: RWKV_MODEL=data/models/...
    make lab); absolute, so that the processes a tool starts elsewhere (the serving worker) find the same folder.
    `name` as given where neither has it."""
    path = Path(name).expanduser()
    if path.is_absolute() or path.exists():
        return path.absolute()
    return REPO_ROOT / path if (REPO_ROOT / path).exists() else path


def _folder_source(folder, name=None):
    config = _read_config(folder / "config.json", str(folder))
    if not checkpoint_files(folder):
        raise UserError(f"{folder} has a config.json but no weights (model.safetensors or pytorch_model.bin).")
    return ModelSource(str(folder), config, offline="offline_checkpoint" in config, name=name or folder.name)
