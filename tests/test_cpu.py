from pathlib import Path

import pytest

from conftest import run_python
from helpers.measure import provenance
from helpers.runtime import cpu, fused_decode, library
from helpers.runtime.errors import UserError

ZEN3 = Path(__file__).parent / "cpus" / "epyc-zen3.cpuinfo"
AVX2_ONLY = {"avx", "avx2", "fma"}  # e.g. AMD Zen 2
ZEN4 = AVX2_ONLY | cpu.AVX512 | {"avx512_vnni"}  # AVX-512 without AMX, on a non-Intel vendor
SAPPHIRE_RAPIDS = ZEN4 | {"avx_vnni", "amx_tile", "amx_int8"}
PROC_CPUINFO = "".join(f"""processor\t: {number}
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC 9654
physical id\t: {socket}
core id\t: 0
flags\t\t: fpu avx avx2 fma
""" for number, socket in enumerate([0, 0, 1]))  # two logical CPUs of one core on socket 0, one on socket 1


def fake_cpu(flags, vendor="AuthenticAMD"):
    return cpu.CpuInfo(vendor, "test CPU", 8, 1, frozenset(flags))


@pytest.fixture
def libs_dir(tmp_path):
    for build, _ in cpu.NATIVE_BUILDS:
        (tmp_path / f"libllama_{build}.so").touch()
    return tmp_path


def test_parses_proc_cpuinfo():
    info = cpu._parse_proc_cpuinfo(PROC_CPUINFO)
    assert (info.vendor, info.model, info.physical_cores, info.sockets) == ("AuthenticAMD", "AMD EPYC 9654", 2, 2)
    assert (info.family, info.model_number) == ("25", "17")  # "model" is the number, "model name" the name
    assert info.has("avx2", "fma") and not info.has("avx512f")


@pytest.mark.parametrize("flags, build", [(SAPPHIRE_RAPIDS, "amx"), (ZEN4, "avx512"), (AVX2_ONLY, "avx2"), ({"avx"}, "avx")])
def test_chooses_by_flags_not_vendor(libs_dir, flags, build):
    choice = cpu.choose_native_library(fake_cpu(flags), libs_dir)
    assert choice.build == build and choice.path.endswith(f"libllama_{build}.so")


def test_never_chooses_a_build_the_cpu_lacks(libs_dir):
    for build, needed in cpu.NATIVE_BUILDS:
        for missing in needed:
            lacking = fake_cpu(needed - {missing})
            if lacking.has("avx"):
                assert cpu.choose_native_library(lacking, libs_dir).build != build


def test_a_wanted_build_is_chosen_where_the_cpu_runs_it(libs_dir):
    assert cpu.choose_native_library(fake_cpu(SAPPHIRE_RAPIDS), libs_dir, wanted="avx2").build == "avx2"
    with pytest.raises(UserError, match="RWKV_NATIVE_BUILD=avx512 is not a build this CPU runs; choose one of avx2, avx"):
        cpu.choose_native_library(fake_cpu(AVX2_ONLY), libs_dir, wanted="avx512")


def test_no_avx_is_refused(libs_dir):
    with pytest.raises(UserError, match="AVX"):
        cpu.choose_native_library(fake_cpu({"sse4_2"}), libs_dir)


def test_missing_avx2_says_what_to_do():
    with pytest.raises(UserError, match="lacks AVX2"):
        cpu.require_avx2(fake_cpu({"avx"}))


def test_the_chosen_library_is_the_one_loaded():
    chosen, loaded = run_python(
        "from helpers.runtime import cpu, library, startup\nchoice = startup.start()\nlibrary.low_bit_linear()\n"
        "print(choice.build, cpu.loaded_native_library())"
    ).split()
    assert loaded == f"libllama_{chosen}.so"


def test_a_wanted_build_is_the_one_loaded():
    build, loaded = run_python(
        "from helpers.runtime import cpu, library, startup\nchoice = startup.start()\nlibrary.low_bit_linear()\n"
        "print(choice.build, cpu.loaded_native_library())",
        env={"RWKV_NATIVE_BUILD": "avx2", "LLAMA_CPP_LIB": None},  # as this process's own choice is inherited
    ).split()
    assert (build, loaded) == ("avx2", "libllama_avx2.so")


CHOICE_AND_LOADED = ("from helpers.runtime import cpu, library, startup\nchoice = startup.start()\n"
                     "library.low_bit_linear()\n"
                     "print(choice.build, choice.reason.replace(' ', '_'), cpu.loaded_native_library())")


@pytest.mark.library_independent
@pytest.mark.parametrize("build", ["avx2", "avx"])  # avx2: on an AVX2-only CPU, the build we would choose too
def test_user_setting_wins(build):
    path = library.libs_dir() / f"libllama_{build}.so"
    chosen, reason, loaded = run_python(CHOICE_AND_LOADED, env={
        "LLAMA_CPP_LIB": str(path), "RWKV_NATIVE_BUILD": None, "RWKV_CHOSEN_NATIVE_LIBRARY": None}).split()
    assert (chosen, reason, loaded) == (build, "set_by_you_in_LLAMA_CPP_LIB", f"libllama_{build}.so")


@pytest.mark.library_independent
def test_a_choice_inherited_from_a_parent_is_made_again():
    inherited = str(library.libs_dir() / "libllama_avx.so")  # as a parent that chose avx hands it down
    chosen, reason, loaded = run_python(CHOICE_AND_LOADED, env={
        "LLAMA_CPP_LIB": inherited, "RWKV_CHOSEN_NATIVE_LIBRARY": inherited, "RWKV_NATIVE_BUILD": "avx2"}).split()
    assert (chosen, reason, loaded) == ("avx2", "chosen_by_RWKV_NATIVE_BUILD_(avx2,_fma)", "libllama_avx2.so")


def test_a_stand_in_cpuinfo_is_what_every_choice_sees(monkeypatch):
    monkeypatch.setenv("RWKV_CPUINFO", str(ZEN3))
    info = cpu.cpu_info()
    assert (info.model, info.physical_cores) == ("AMD EPYC 7763 64-Core Processor", 2)
    assert info.has("avx2", "fma", "f16c") and not info.flags & (cpu.AVX512 | {"avx512_vnni", "avx_vnni", "amx_int8"})
    assert cpu.choose_native_library(libs_dir=library.libs_dir()).build == "avx2"
    assert list(fused_decode.runnable_kernels()) == ["avx2"]
    made = provenance.machine()  # a run made so is recorded as this machine's, saying how it ran
    assert made["cpu"] == cpu.cpu_info(real=True).model and made["run_as"] == str(ZEN3)
    assert provenance.describe(made).endswith(f", run as {ZEN3} describes its CPU")


def test_a_stand_in_cpuinfo_may_not_claim_what_this_cpu_lacks(monkeypatch, tmp_path):
    real = cpu._parse_proc_cpuinfo(Path("/proc/cpuinfo").read_text())
    claimed = tmp_path / "cpuinfo"
    claimed.write_text(ZEN3.read_text().replace(" avx2 ", " avx2 amx_tile amx_int8 avx512f avx_vnni avx512_fp16 "))
    monkeypatch.setenv("RWKV_CPUINFO", str(claimed))
    lacking = sorted({"amx_tile", "amx_int8", "avx512f", "avx_vnni", "avx512_fp16"} - real.flags)
    with pytest.raises(UserError, match=f"claims {', '.join(lacking)}, which this CPU lacks"):
        cpu.cpu_info()
    monkeypatch.setenv("RWKV_CPUINFO", str(tmp_path / "missing"))
    with pytest.raises(UserError, match="cannot be read"):
        cpu.cpu_info()


def test_siblings_numbered_apart_are_one_physical_core():
    info = cpu._parse_proc_cpuinfo(topology_cpuinfo(sockets=2, cores=2))
    assert info.physical_cores == 4 and info.sockets == 2
    assert list(info.physical_cores_of(range(8)).values()) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert list(info.physical_cores_of({0, 1, 4}).values()) == [[0, 4], [1]]


def topology_cpuinfo(sockets, cores, threads=2):
    """A /proc/cpuinfo of `sockets` x `cores` physical cores of `threads` threads each, numbered as Linux does on
    many servers: every core's first thread, socket by socket, then every core's second thread (n + cores in all)."""
    lines, apart = [], sockets * cores
    for number in range(threads * apart):
        first = number % apart
        lines += [f"processor\t: {number}", "vendor_id\t: GenuineIntel", f"physical id\t: {first // cores}",
                  f"core id\t\t: {first % cores}", "flags\t\t: avx avx2 fma", ""]
    return "\n".join(lines)
