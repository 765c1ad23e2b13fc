"""A checkpoint's weight files, read without trusting them: where each tensor lies, in what dtype and shape.

Both layouts are read from their headers alone: safetensors (an 8-byte length, a JSON header, the data) and
the zip that torch.save writes (pytorch_model.bin: data.pkl pickles the tensors over storages stored as
<archive>/data/<key>). Nothing a file says is believed unchecked: shard names must stay inside the model
folder, every tensor's bytes must lie inside its file (or zip member) and match its dtype and shape, only
fp16, bf16 and fp32 tensors are accepted, and the pickle may build nothing but a state dict of tensors (no
code from the file runs). Anything else is a UserError that names the file and says what to do.
"""
import io
import json
import math
import pickle
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch

from helpers.runtime.errors import UserError

SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
TORCH_STORAGE_DTYPES = {"HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16, "FloatStorage": torch.float32}
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # each alone, or in shards listed by NAME.index.json
MAX_HEADER_BYTES = 100 * 2**20  # on the JSON header: about safetensors' own limit (100 MB)
ZIP_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, 22 bytes we skip, name length, extra field length
# What a damaged or forged file makes the parsers raise (json, struct, zipfile, pickle, and the checks here).
PARSE_ERRORS = (OSError, ValueError, KeyError, TypeError, IndexError, OverflowError, EOFError, RecursionError,
                NotImplementedError, struct.error, zipfile.BadZipFile, pickle.UnpicklingError)
FIX = "download it again, or re-save it with save_pretrained"


class BadFile(ValueError):
    """What is wrong with a checkpoint file, in words (TensorFile turns it into a UserError)."""


def weight_files(folder, single_name):
    """A checkpoint's files of one kind, in shard order: the shards its index lists, or the single file;
    empty when it has neither. Every file lies inside the folder (UserError otherwise)."""
    folder = Path(folder)
    index = folder / f"{single_name}.index.json"
    if index.exists():
        return [_inside(folder, name, index) for name in dict.fromkeys(_shard_names(index))]
    return [_inside(folder, single_name, folder)] if (folder / single_name).exists() else []


def checkpoint_files(folder):
    """The checkpoint's weight files: safetensors where it has them, else torch's .bin; empty when neither."""
    return weight_files(folder, WEIGHT_FILES[0]) or weight_files(folder, WEIGHT_FILES[1])


def _shard_names(index):
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = list(weight_map.values())
    except (*PARSE_ERRORS, AttributeError) as error:
        raise UserError(f"{index} is not a shard index with a weight_map ({error!r}); {FIX}.") from None
    if not names:
        raise UserError(f"{index} lists no weight files; {FIX}.")
    for name in names:
        if not isinstance(name, str):
            raise UserError(f"{index} names the weight file {name!r}, which is not a file name; {FIX}.")
    return names


def _inside(folder, name, named_by):
    """folder / name, where name is a relative path that stays inside the folder, and so does the file it leads
    to (or to the Hugging Face cache's blob behind a snapshot's link)."""
    if not name or "\\" in name or any(character < " " for character in name):
        raise UserError(f"{named_by} names the weight file {name!r}, which is not a file name; {FIX}.")
    relative = PurePosixPath(name)
    if relative.is_absolute() or ".." in relative.parts:
        raise UserError(f"{named_by} names the weight file {name!r}, outside {folder}; weights are read only from "
                        f"inside the model folder: {FIX}.")
    path = folder / relative
    try:
        real, real_folder, is_file = path.resolve(), folder.resolve(), path.is_file()
    except (OSError, RuntimeError):  # a name too long, a loop of links
        real, real_folder, is_file = path, folder, False
    hub_blob = real_folder.parent.name == "snapshots" and real.parent == real_folder.parent.parent / "blobs"
    if not (real.is_relative_to(real_folder) or hub_blob):
        raise UserError(f"{path} leads outside {folder} (to {real}); weights are read only from inside the model "
                        "folder: copy the file there.")
    if not is_file:
        raise UserError(f"{named_by} names the weight file {name!r}, which {folder} does not hold; {FIX}.")
    return path


@dataclass
class TensorEntry:
    dtype: torch.dtype
    shape: list
    offset: int  # of its first byte in the file

    @property
    def nbytes(self):
        return math.prod(self.shape) * self.dtype.itemsize


class TensorFile:
    """The tensors of one checkpoint file, read with plain reads at their offsets rather than through a memory
    map, so that what a read brings in is freed with its tensor (a mapped file stays in the process's memory
    while open)."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            entries = _torch_zip_entries(self.path, size) if self.path.suffix == ".bin" else _safetensors_entries(self.path, size)
        except PARSE_ERRORS as error:
            raise UserError(f"{self.path} cannot be read as a checkpoint ({error}); {FIX}.") from None
        self.entries = dict(sorted(entries.items(), key=lambda item: item[1].offset))

    def read(self, name, first_row=0, rows=None, out=None):
        """Rows [first_row, first_row + rows) of a tensor (all of it by default), into `out` if given."""
        entry = self.entries[name]
        if out is None:
            out = torch.empty(entry.shape if rows is None else [rows, *entry.shape[1:]], dtype=entry.dtype)
        row_bytes = math.prod(entry.shape[1:]) * entry.dtype.itemsize
        target = memoryview(out.view(-1).view(torch.uint8).numpy())
        with open(self.path, "rb", buffering=0) as file:  # a file of its own: threads read at once
            file.seek(entry.offset + first_row * row_bytes)
            while target.nbytes:
                count = file.readinto(target)
                if not count:
                    raise UserError(f"{self.path} is truncated (at {name!r}); download or rebuild the checkpoint.")
                target = target[count:]
        return out


def _count(value, what):
    """A non-negative int from a file's header (not a bool, a float or a string)."""
    if type(value) is not int or value < 0:
        raise BadFile(f"{what} is {value!r}, not a count")
    return value


def _shape(value, name):
    if not isinstance(value, (list, tuple)):
        raise BadFile(f"{name!r} has the shape {value!r}")
    return [_count(size, f"a size of {name!r}") for size in value]


def _check_tiling(spans, data_bytes):
    """Refuse tensors whose bytes ({name: (begin, end)}) do not tile the data exactly, as safetensors' own reader
    does: no tensor overlaps another or lies past the end, and no byte is left over."""
    end = 0
    for name, (begin, stop) in sorted(spans.items(), key=lambda item: item[1]):
        if begin != end or stop > data_bytes:
            raise BadFile(f"{name!r} spans bytes {begin} to {stop} of {data_bytes}, where the tensor before it ends at "
                          f"{end}: the file is truncated or damaged")
        end = stop
    if end != data_bytes:
        raise BadFile(f"its tensors end at byte {end} of its {data_bytes} bytes of data: the file is damaged")


def _safetensors_entries(path, size):
    with open(path, "rb") as file:
        head = file.read(8)
        if len(head) < 8:
            raise BadFile("it is shorter than a safetensors header")
        (header_size,) = struct.unpack("<Q", head)
        if header_size > min(MAX_HEADER_BYTES, size - 8):
            raise BadFile(f"its header claims {header_size} bytes of a {size}-byte file: it is truncated or damaged")
        header = json.loads(file.read(header_size))
    if not isinstance(header, dict):
        raise BadFile("its header is not a JSON object")
    header.pop("__metadata__", None)
    entries, spans = {}, {}
    for name, fields in header.items():
        if not isinstance(fields, dict):
            raise BadFile(f"its header describes {name!r} as {fields!r}")
        if fields.get("dtype") not in SAFETENSORS_DTYPES:
            raise UserError(f"{path} holds {name!r} as {fields.get('dtype')!r}; expected fp16, bf16 or fp32 weights.")
        offsets = fields.get("data_offsets")
        if not isinstance(offsets, list) or len(offsets) != 2:
            raise BadFile(f"{name!r} has the data offsets {offsets!r}")
        begin, end = (_count(offset, f"an offset of {name!r}") for offset in offsets)
        entry = TensorEntry(SAFETENSORS_DTYPES[fields["dtype"]], _shape(fields.get("shape"), name), 8 + header_size + begin)
        if end - begin != entry.nbytes:
            raise BadFile(f"{name!r} spans bytes {begin} to {end}, but its shape and dtype make it {entry.nbytes} bytes")
        entries[name], spans[name] = entry, (begin, end)
    _check_tiling(spans, size - 8 - header_size)
    return entries


class _StateDictIndex(pickle.Unpickler):
    """Unpickles the data.pkl of a torch.save zip into {name: (storage key, TensorEntry in its storage, storage numel)},
    reading no tensor data and allowing only what a state dict of tensors holds (an OrderedDict with its
    _metadata, torch's tensor rebuild, the fp16, bf16 and fp32 storage types): unlike torch.load, no code
    from the file runs."""

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return self.tensor
        if module == "torch" and name in TORCH_STORAGE_DTYPES:
            return TORCH_STORAGE_DTYPES[name]
        raise pickle.UnpicklingError(f"it holds {f'{module}.{name}'!r}, not only fp16, bf16 or fp32 tensors")

    def persistent_load(self, saved_id):
        """('storage', storage type, key, location, numel) -> (key, dtype, numel)."""
        if not (isinstance(saved_id, tuple) and len(saved_id) == 5 and saved_id[0] == "storage"):
            raise pickle.UnpicklingError(f"it refers to {saved_id!r}, not to a storage")
        _, dtype, key, _location, numel = saved_id
        if dtype not in TORCH_STORAGE_DTYPES.values() or not isinstance(key, str):
            raise pickle.UnpicklingError(f"it holds a storage of {dtype!r}, not of fp16, bf16 or fp32")
        return key, dtype, _count(numel, "a storage's size")

    @staticmethod
    def tensor(storage, storage_offset, shape, stride, *_):
        if not (isinstance(storage, tuple) and len(storage) == 3 and isinstance(stride, tuple)):
            raise pickle.UnpicklingError("it rebuilds a tensor from something other than a storage")
        key, dtype, numel = storage
        shape = _shape(shape, "a tensor")
        offset = _count(storage_offset, "a tensor's offset")
        if offset + math.prod(shape) > numel:
            raise pickle.UnpicklingError(f"a tensor of shape {shape} at {offset} overruns its storage of {numel}")
        contiguous = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
        if stride != contiguous and math.prod(shape) > 1:
            raise pickle.UnpicklingError("a tensor is stored non-contiguously; re-save it with save_pretrained")
        return key, TensorEntry(dtype, shape, offset * dtype.itemsize), numel


def _state_dict(data_pkl):
    """{name: (storage key, entry with its offset in the storage, storage numel)} of a data.pkl."""
    try:
        state_dict = _StateDictIndex(io.BytesIO(data_pkl)).load()
    except Exception as error:  # whatever damaged pickle opcodes raise: no code from the file has run
        raise pickle.UnpicklingError(str(error) or type(error).__name__) from None
    if not isinstance(state_dict, dict):
        raise BadFile(f"it holds a {type(state_dict).__name__}, not a state dict")
    for name, value in state_dict.items():
        if not (isinstance(name, str) and isinstance(value, tuple) and len(value) == 3
                and isinstance(value[1], TensorEntry)):
            raise BadFile(f"its state dict holds {name!r}, which is not a tensor")
    return state_dict


def _torch_zip_entries(path, size):
    """Entries of a file written by torch.save in its zip format: each storage is stored uncompressed as
    <archive>/data/<key>, and <archive>/data.pkl pickles the tensors over them."""
    with zipfile.ZipFile(path) as archive, open(path, "rb") as file:
        pickled = next((name for name in archive.namelist() if name.endswith("/data.pkl")), None)
        if pickled is None:
            raise BadFile("no data.pkl: torch's legacy format? re-save it with save_pretrained")
        prefix = pickled[:-len("data.pkl")]
        entries, storage_of = {}, {}
        for name, (key, entry, numel) in _state_dict(archive.read(pickled)).items():
            if key in storage_of:  # save_pretrained never shares one; a forged reference could
                raise BadFile(f"{name!r} and {storage_of[key]!r} share one storage; re-save it with save_pretrained")
            storage_of[key] = name
            member = archive.getinfo(f"{prefix}data/{key}")
            if member.compress_type != zipfile.ZIP_STORED or member.compress_size != member.file_size:
                raise BadFile(f"{name!r} is compressed")
            file.seek(member.header_offset)
            signature, name_length, extra_length = ZIP_LOCAL_HEADER.unpack(file.read(ZIP_LOCAL_HEADER.size))
            if signature != b"PK\x03\x04" or file.read(name_length) != member.filename.encode():
                raise BadFile(f"the zip entry of {name!r} is damaged")
            start = member.header_offset + ZIP_LOCAL_HEADER.size + name_length + extra_length
            if numel * entry.dtype.itemsize != member.file_size or start + member.file_size > size:
                raise BadFile(f"{name!r}'s storage of {numel} values does not fill its {member.file_size} bytes at "
                              f"byte {start} of {size}: the file is truncated or damaged")
            entries[name] = TensorEntry(entry.dtype, entry.shape, start + entry.offset)
    return entries

