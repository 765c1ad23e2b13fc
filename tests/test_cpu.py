import pytest

from conftest import run_python
from helpers.runtime import cpu
from helpers.runtime.errors import UserError

AVX2_ONLY = {"avx", "avx2", "fma"}  # e.g. AMD Zen 2
ZEN4 = AVX2_ONLY | cpu.AVX512 | {"avx512_vnni"}  # AVX-512 without AMX, on a non-Intel vendor
SAPPHIRE_RAPIDS = ZEN4 | {"avx_vnni", "amx_tile", "amx_int8"}
PROC_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC 9654
physical id\t: 0
core id\t: 0
flags\t\t: fpu avx avx2 fma
processor\t: 1
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC 9654
physical id\t: 0
core id\t: 0
flags\t\t: fpu avx avx2 fma
processor\t: 2
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC 9654
physical id\t: 1
core id\t: 0
flags\t\t: fpu avx avx2 fma
"""


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
        "from helpers.runtime import cpu, startup\nchoice = startup.start()\nimport bigdl.llm.transformers.low_bit_linear\n"
        "print(choice.build, cpu.loaded_native_library())"
    ).split()
    assert loaded == f"libllama_{chosen}.so"


def test_a_wanted_build_is_the_one_loaded():
    build, loaded = run_python(
        "from helpers.runtime import cpu, startup\nchoice = startup.start()\nimport bigdl.llm.transformers.low_bit_linear\n"
        "print(choice.build, cpu.loaded_native_library())",
        env={"RWKV_NATIVE_BUILD": "avx2", "LLAMA_CPP_LIB": None},  # as this process's own choice is inherited
    ).split()
    assert (build, loaded) == ("avx2", "libllama_avx2.so")


def test_user_setting_wins():
    avx2 = cpu.bigdl_libs_dir() / "libllama_avx2.so"
    reason, loaded = run_python(
        "from helpers.runtime import cpu, startup\nchoice = startup.start()\nimport bigdl.llm.transformers.low_bit_linear\n"
        "print(choice.reason.replace(' ', '_'), cpu.loaded_native_library())",
        env={"LLAMA_CPP_LIB": str(avx2), "RWKV_NATIVE_BUILD": None},
    ).split()
    assert reason == "set_by_you_in_LLAMA_CPP_LIB" and loaded == "libllama_avx2.so"
