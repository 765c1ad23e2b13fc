"""Hostile and damaged checkpoints: a property-based run mutates small checkpoints of every layout the loader
reads (a safetensors header, torch.save's zip directory and local headers, its data.pkl's pickle opcodes, a shard
index) and holds that each loads the very tensors of the original or is refused with a one-line UserError: no
other exception, no file opened outside the model folder, and no more address space than a small budget."""
import contextlib
import io
import json
import resource
import shutil
import struct
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from helpers.runtime.errors import UserError
from helpers.runtime.tensor_loading import quantized_from_checkpoint

ADDRESS_SPACE_BUDGET = 512 * 2**20  # above what the process has mapped before a load; a load here maps ~100 MiB
FUZZ = settings(max_examples=400, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
OUTSIDE = "outside.bin"  # a valid shard beside the model folder: a reader that follows a name out of it would load it

_opened = None  # the paths opened while a load is watched


def _watch_opens(event, args):
    if event == "open" and _opened is not None and isinstance(args[0], (str, bytes, Path)):
        _opened.append(Path(args[0].decode() if isinstance(args[0], bytes) else args[0]))


sys.addaudithook(_watch_opens)


@contextlib.contextmanager
def opens_recorded():
    global _opened
    _opened = []
    try:
        yield _opened
    finally:
        _opened = None


@contextlib.contextmanager
def address_space_limited(budget):
    """RLIMIT_AS at what is mapped now plus budget: an allocation beyond it fails (MemoryError or RuntimeError)."""
    mapped_kib = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmSize:"))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (mapped_kib * 1024 + budget, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def python_module(path):
    """A module of Python's own or of an installed package that a parser imports on first use (json's UTF-16 codec)."""
    return path.suffix in {".py", ".pyc", ".so"} and any(path.is_relative_to(prefix) for prefix in {sys.prefix, sys.base_prefix})


def load(folder):
    return {name: parameter.data for name, parameter in quantized_from_checkpoint(folder, "sym_int4").named_parameters()}


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """A 2-layer RWKV-4 of width 32 saved by transformers in each layout: {layout: folder}, and its loaded tensors."""
    from transformers import RwkvConfig, RwkvForCausalLM

    torch.manual_seed(0)
    config = RwkvConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, attention_hidden_size=32,
                        intermediate_size=64, context_length=64)
    model = RwkvForCausalLM(config).half()
    root = tmp_path_factory.mktemp("micro")
    folders = {"safetensors": root / "safetensors", "bin": root / "bin", "shards": root / "shards"}
    model.save_pretrained(folders["safetensors"], safe_serialization=True)
    model.save_pretrained(folders["bin"], safe_serialization=False)
    model.save_pretrained(folders["shards"], safe_serialization=False, max_shard_size="16KB")
    shutil.copy(next(folders["shards"].glob("pytorch_model-*.bin")), root / OUTSIDE)
    original = load(folders["safetensors"])
    for folder in folders.values():
        assert_same(load(folder), original)
    return Micro(folders, original)


class Micro(tuple):
    """(folders, original tensors), shown briefly where hypothesis reports an example."""

    def __new__(cls, folders, original):
        return super().__new__(cls, (folders, original))

    def __repr__(self):
        return f"micro checkpoints in {self[0]['bin'].parent}"


def copy_of(micro, layout, folder):
    """A copy of the micro checkpoint of one layout, in folder, to damage."""
    shutil.copytree(micro[0][layout], folder)
    return folder


def assert_same(loaded, original):
    assert loaded.keys() == original.keys()
    for name, tensor in original.items():
        assert torch.equal(loaded[name], tensor), name


def check_mutated(source, mutate, original):
    """Copy the folder, let mutate(folder) damage it, load it: the original's tensors or a one-line UserError,
    with every file opened inside the folder and within the address-space budget."""
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "model"
        shutil.copytree(source, folder)
        shutil.copy(source.parent / OUTSIDE, Path(scratch) / OUTSIDE)
        mutate(folder)
        with address_space_limited(ADDRESS_SPACE_BUDGET), opens_recorded() as opened:
            try:
                loaded = load(folder)
            except UserError as error:
                assert "\n" not in str(error), str(error)
                loaded = None
        outside = [path for path in opened if not (path.resolve().is_relative_to(folder.resolve()) or python_module(path))]
        assert not outside, f"opened {outside}"
        if loaded is not None:
            assert_same(loaded, original)


def overwritten(data, changes):
    data = bytearray(data)
    for position, byte in changes:
        data[position % len(data)] = byte
    return bytes(data)


changes = st.lists(st.tuples(st.integers(0, 2**31), st.integers(0, 255)), min_size=1, max_size=4)
# a number that JSON or a header might hold instead of the right one
numbers = st.one_of(st.integers(-2**70, 2**70), st.sampled_from([0, 1, 2**31, 2**32, 2**63, 2**64 - 1]))


def edit(path, function):
    path.write_bytes(function(path.read_bytes()))


@FUZZ
@given(mutation=st.one_of(
    st.tuples(st.just("header bytes"), changes),
    st.tuples(st.just("header size"), numbers),
    st.tuples(st.just("header field"), st.integers(0, 2**31), st.sampled_from(["dtype", "shape", "data_offsets"]),
              st.one_of(numbers, st.lists(numbers, max_size=3), st.sampled_from(["F64", "I8", "BF16", "F32", None]))),
    st.tuples(st.just("cut"), st.integers(0, 2**31)),
))
def test_a_damaged_safetensors_header(micro, mutation):
    folders, original = micro

    def damage(data):
        (header_size,) = struct.unpack("<Q", data[:8])
        kind, *args = mutation
        if kind == "header bytes":
            return overwritten(data[:8 + header_size], [(8 + p % header_size, b) for p, b in args[0]]) + data[8 + header_size:]
        if kind == "header size":
            return struct.pack("<Q", args[0] % 2**64) + data[8:]
        if kind == "cut":
            return data[:args[0] % len(data)]
        header = json.loads(data[8:8 + header_size])
        names = sorted(name for name in header if name != "__metadata__")
        header[names[args[0] % len(names)]][args[1]] = args[2]
        text = json.dumps(header).encode()
        return struct.pack("<Q", len(text)) + text + data[8 + header_size:]

    check_mutated(folders["safetensors"], lambda folder: edit(folder / "model.safetensors", damage), original)


def zip_regions(data):
    """(start, end) of the metadata of a zip: every local header with its name, the central directory and its end."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        members = archive.infolist()
        directory_start = archive.start_dir
    return [(m.header_offset, m.header_offset + 30 + len(m.filename)) for m in members] + [(directory_start, len(data))]


def with_data_pkl(data, new_pkl):
    """The zip rebuilt with its data.pkl replaced (stored, as torch.save stores everything)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as archive, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as rebuilt:
        for member in archive.infolist():
            rebuilt.writestr(member, new_pkl(archive.read(member)) if member.filename.endswith("/data.pkl")
                             else archive.read(member))
    return out.getvalue()


@FUZZ
@given(mutation=st.one_of(
    st.tuples(st.just("zip metadata"), st.integers(0, 2**31), changes),
    st.tuples(st.just("pickle opcodes"), changes),
    st.tuples(st.just("pickle insert"), st.integers(0, 2**31), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("pickle cut"), st.integers(0, 2**31)),
))
def test_a_damaged_torch_zip(micro, mutation):
    folders, original = micro

    def damage(data):
        kind, *args = mutation
        if kind == "zip metadata":
            regions = zip_regions(data)
            start, end = regions[args[0] % len(regions)]
            return overwritten(data, [(start + p % (end - start), b) for p, b in args[1]])
        if kind == "pickle opcodes":
            return with_data_pkl(data, lambda pkl: overwritten(pkl, args[0]))
        if kind == "pickle insert":
            return with_data_pkl(data, lambda pkl: pkl[:args[0] % len(pkl)] + args[1] + pkl[args[0] % len(pkl):])
        return with_data_pkl(data, lambda pkl: pkl[:args[0] % len(pkl)])

    check_mutated(folders["bin"], lambda folder: edit(folder / "pytorch_model.bin", damage), original)


HOSTILE_NAMES = ["/etc/passwd", f"../{OUTSIDE}", f"sub/../../{OUTSIDE}", f"./../{OUTSIDE}", "", ".", "config.json",
                 "missing.bin", "/proc/self/environ", f"{'x' * 300}.bin", "a\nb.bin", "a\\..\\..\\b.bin"]


@FUZZ
@given(mutation=st.one_of(
    st.tuples(st.just("shard names"), st.dictionaries(st.integers(0, 2**31), st.one_of(
        st.sampled_from(HOSTILE_NAMES), st.text(max_size=12), numbers, st.none(), st.lists(st.integers(), max_size=2)),
        min_size=1, max_size=3)),
    st.tuples(st.just("index text"), st.one_of(st.binary(max_size=40), st.sampled_from(
        ['{"weight_map": {}}', '{"weight_map": []}', '{"weight_map": "x"}', "[]", "null", '{"metadata": {}}',
         "[" * 100_000]))),
))
def test_a_hostile_shard_index(micro, mutation):
    folders, original = micro

    def damage(folder):
        index = folder / "pytorch_model.bin.index.json"
        kind, value = mutation
        if kind == "index text":
            index.write_bytes(value.encode() if isinstance(value, str) else value)
            return
        contents = json.loads(index.read_text())
        names = sorted(contents["weight_map"])
        for position, name in value.items():
            contents["weight_map"][names[position % len(names)]] = name
        index.write_text(json.dumps(contents))

    check_mutated(folders["shards"], damage, original)


def test_a_state_dict_saved_by_torch_loads(micro, tmp_path):
    """torch.save(model.state_dict()): an OrderedDict with _metadata, the most common .bin a user has."""
    from transformers import AutoModelForCausalLM

    folders, original = micro
    folder = copy_of(micro, "safetensors", tmp_path / "state_dict")
    (folder / "model.safetensors").unlink()
    state_dict = AutoModelForCausalLM.from_pretrained(folders["safetensors"], torch_dtype=torch.float16).state_dict()
    assert hasattr(state_dict, "_metadata")
    torch.save(state_dict, folder / "pytorch_model.bin")
    assert_same(load(folder), original)


def test_an_empty_state_dict_is_refused_in_one_line(micro, tmp_path):
    folder = copy_of(micro, "bin", tmp_path / "empty")
    torch.save({}, folder / "pytorch_model.bin")
    with pytest.raises(UserError, match="holds no tensors"):
        load(folder)


def test_a_link_out_of_the_folder_is_refused_unread(micro, tmp_path):
    folders, _ = micro
    folder = copy_of(micro, "bin", tmp_path / "linked")
    (folder / "pytorch_model.bin").unlink()
    (folder / "pytorch_model.bin").symlink_to(folders["bin"] / "pytorch_model.bin")
    with opens_recorded() as opened, pytest.raises(UserError, match="leads outside .* copy the file there"):
        load(folder)
    assert not any(path.name == "pytorch_model.bin" for path in opened)


def test_the_hub_caches_links_to_its_blobs_are_followed(micro, tmp_path):
    """The Hugging Face cache keeps each file once, in blobs/, and links a snapshot's files to it."""
    folders, original = micro
    repo = tmp_path / "models--RWKV--micro"
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for file in folders["bin"].iterdir():
        shutil.copy(file, repo / "blobs" / f"blob-{file.name}")
        (snapshot / file.name).symlink_to(Path("../..") / "blobs" / f"blob-{file.name}")
    assert_same(load(snapshot), original)


def rewritten_header(path, change):
    """Rewrite a safetensors file's header through change(header), keeping its data."""
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + size])
    change(header)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + size:])


def same_sized(header):
    """Two tensors of one shape and dtype, in the header's order."""
    by_shape = {}
    for name, fields in header.items():
        if name != "__metadata__":
            by_shape.setdefault((fields["dtype"], tuple(fields["shape"])), []).append(name)
    return next(names for names in by_shape.values() if len(names) > 1)[:2]


@pytest.mark.parametrize("forge, message", [
    ("alias", "spans bytes .* where the tensor before it ends"),  # a tensor reads another's bytes
    ("negative", "not a count"),
    ("past the end", "truncated or damaged"),
    ("dtype", "holds .* as 'I64'; expected fp16, bf16 or fp32"),
    ("huge shape", "its shape and dtype make it"),
])
def test_a_forged_safetensors_entry_is_refused(micro, tmp_path, forge, message):
    folder = copy_of(micro, "safetensors", tmp_path / "forged")

    def change(header):
        first, second = same_sized(header)
        if forge == "alias":
            header[second]["data_offsets"] = header[first]["data_offsets"]
        elif forge == "negative":
            header[first]["data_offsets"][0] = -8
        elif forge == "past the end":
            begin, end = header[first]["data_offsets"]
            header[first]["data_offsets"] = [begin + 2**40, end + 2**40]
        elif forge == "dtype":
            header[first]["dtype"] = "I64"
        else:
            header[first]["shape"] = [2**40, 2**40]

    rewritten_header(folder / "model.safetensors", change)
    with address_space_limited(ADDRESS_SPACE_BUDGET), pytest.raises(UserError, match=message):
        load(folder)


def saved_bin(folder, state_dict):
    (folder / "pytorch_model.bin").unlink()
    torch.save(state_dict, folder / "pytorch_model.bin")


def test_tensors_sharing_a_storage_are_refused(micro, tmp_path):
    """save_pretrained never shares a storage between two tensors; a forged reference could make one tensor read
    another's bytes."""
    folder = copy_of(micro, "bin", tmp_path / "shared")
    state_dict = torch.load(folder / "pytorch_model.bin", weights_only=True)
    first, second = [name for name, tensor in state_dict.items() if tensor.shape == state_dict["rwkv.ln_out.weight"].shape][:2]
    state_dict[second] = state_dict[first]
    saved_bin(folder, state_dict)
    with pytest.raises(UserError, match="share one storage"):
        load(folder)


@pytest.mark.parametrize("dtype", [torch.int64, torch.float64, torch.int8])
def test_a_bin_of_another_dtype_is_refused(micro, tmp_path, dtype):
    folder = copy_of(micro, "bin", tmp_path / "other-dtype")
    state_dict = torch.load(folder / "pytorch_model.bin", weights_only=True)
    state_dict["head.weight"] = state_dict["head.weight"].to(dtype)
    saved_bin(folder, state_dict)
    with pytest.raises(UserError, match="not only fp16, bf16 or fp32 tensors"):
        load(folder)


def test_a_storage_larger_than_its_member_is_refused(micro, tmp_path):
    """The numel a storage's reference claims must be the bytes its zip member holds."""
    folder = copy_of(micro, "bin", tmp_path / "overrun")
    path = folder / "pytorch_model.bin"
    data = path.read_bytes()

    def claim_more(pkl):
        # the first storage of vocab x hidden = 2048 values (pickled as BININT2: 'M' and 2 bytes) claims one more
        numel = b"M" + struct.pack("<H", 64 * 32)
        assert numel in pkl
        return pkl.replace(numel, b"M" + struct.pack("<H", 64 * 32 + 1), 1)

    path.write_bytes(with_data_pkl(data, claim_more))
    with pytest.raises(UserError, match="does not fill its|overruns its storage"):
        load(folder)
