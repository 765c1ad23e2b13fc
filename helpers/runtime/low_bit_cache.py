"""The low-bit cache: a model converted once, saved by the low-bit library's save_low_bit in data/models/low-bit/.

Each cache folder holds what save_low_bit writes, copies of the model folder's other files (its tokenizer
module, vocabulary and settings, whatever the tokenizer class: some cannot save_pretrained), and last a
manifest of it all. A folder without the manifest, with a file of another size than the manifest says,
or made from other checkpoint files than the folder now holds, or by the other library, is rebuilt. RWKV_LOW_BIT_CACHE=0 turns
the cache off.
"""
import hashlib
import json
import shutil
from pathlib import Path

from helpers.runtime import library, settings
from helpers.runtime.paths import MODELS_DIR, REPO_ROOT
from helpers.runtime.checkpoint_files import WEIGHT_FILES, checkpoint_files

CACHE_DIR = MODELS_DIR / "low-bit"
MANIFEST = "low_bit_cache.json"  # written last: a cache without it is unfinished


def cache_enabled():
    """False when the low_bit_cache setting is off (RWKV_LOW_BIT_CACHE=0): every load then converts from the checkpoint."""
    return settings.read().low_bit_cache


def cache_dir(source, low_bit):
    """Where the low-bit cache of a model folder lives: named after the folder, told apart by its path
    (relative to the project when inside it, so that every clone names it the same)."""
    place = shown_path(Path(source.location).resolve())
    return CACHE_DIR / f"{source.name}-{hashlib.sha256(place.encode()).hexdigest()[:8]}-{low_bit}"


def shown_path(path):
    """A path relative to the project where it is inside it (the same in every clone), else as it is."""
    try:
        return str(Path(path).relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def _source_files(source):
    """{name: [size, modification time]} of the checkpoint's weight files: a cache made from other files is stale."""
    return {path.name: [path.stat().st_size, path.stat().st_mtime_ns] for path in checkpoint_files(source.location)}


def cache_problem(source, folder):
    """Why the cache in `folder` cannot be used (missing, unfinished, truncated, stale), or None when it can."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return "no cache yet" if not folder.exists() else "the cache is incomplete"
    if manifest.get("source_files") != _source_files(source):
        return "the checkpoint changed since the cache was made"
    if manifest.get("library", "bigdl-llm") != library.name():
        return f"the cache was made by {manifest.get('library', 'bigdl-llm')}, and {library.name()} is in use"
    for name, size in manifest["files"].items():
        if not (folder / name).is_file() or (folder / name).stat().st_size != size:
            return f"{name} in the cache is missing or truncated"
    return None


def planned_loader(source, low_bit="sym_int4"):
    """How helpers.runtime.loading.load_model will load the source: "cache" from a ready low-bit cache (or a folder
    that save_low_bit wrote), else "tensor_by_tensor" from its checkpoint."""
    if source.config.get("bigdl_transformers_low_bit"):
        return "cache"
    if cache_enabled() and not cache_problem(source, cache_dir(source, low_bit)):
        return "cache"
    return "tensor_by_tensor"


def save_cache(model, source, folder):
    """Save a converted model into `folder` with save_low_bit, beside copies of the source folder's other
    files, and finish with the manifest, in one rename."""
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_low_bit(str(partial))
    weights = {path.name for path in checkpoint_files(source.location)} | {f"{name}.index.json" for name in WEIGHT_FILES}
    for path in Path(source.location).iterdir():
        if path.is_file() and path.name not in weights and not (partial / path.name).exists():
            shutil.copyfile(path, partial / path.name)
    files = {path.name: path.stat().st_size for path in partial.iterdir()}
    manifest = {"source": str(source.location), "source_files": _source_files(source), "library": library.name(),
                "files": files}
    (partial / MANIFEST).write_text(json.dumps(manifest, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
