"""Every setting the project takes from the environment, read in this one module: its variable, type,
default, meaning and, for the RWKV_* ones, the command-line flag that sets it on each tool it affects.
docs/setup.md's settings table lists SETTINGS.

Nothing is read at import: `read()` reads the environment when a tool starts, and a tool's flags
(`add_flags`, then `from_flags`) override it. `export()` writes the RWKV_* ones back for the processes
this one starts; the runtime's modules read() when they need a setting, so they see what a tool's flags said.
"""
import os
from dataclasses import dataclass, field, fields

from helpers.runtime.errors import UserError


@dataclass(frozen=True)
class Setting:
    variable: str
    flag: str  # the command-line flag that sets it, or "" for a variable only (another program's, or a folder's)
    help: str


def _setting(variable, flag, help, default=None):
    return field(default=default, metadata={"setting": Setting(variable, flag, help)})


@dataclass(frozen=True)
class Settings:
    model: str | None = _setting("RWKV_MODEL", "--model", "the model: a local folder or the id of a hub model you have "
                                 "downloaded (default: the small model trained here)")
    library: str | None = _setting("RWKV_LIBRARY", "--library", "the low-bit library, where both are installed: "
                                   "bigdl-llm or ipex-llm (default: the one installed, bigdl-llm first)")
    native_build: str | None = _setting("RWKV_NATIVE_BUILD", "--native-build", "the low-bit library's native kernel build: "
                                        "amx, avx512, avxvnni, avx2 or avx (default: the fastest this CPU runs)")
    fused_decode: bool = _setting("RWKV_FUSED_DECODE", "--no-fused-decode", "0: decode low-bit models through torch "
                                  "and the library's kernels, not the fused native step (default: 1)", True)
    fused_kernel: str = _setting("RWKV_FUSED_KERNEL", "--fused-kernel", "the fused step's build: auto, avx512, "
                                 "avxvnni or avx2 (default: auto, the fastest this CPU runs)", "auto")
    low_bit_cache: bool = _setting("RWKV_LOW_BIT_CACHE", "--no-low-bit-cache", "0: convert the checkpoint on every "
                                   "load instead of keeping a low-bit copy (default: 1)", True)
    kernel_cache: str | None = _setting("RWKV_KERNEL_CACHE", "", "the folder the fused step's compiled builds are kept "
                                        "in (default: ~/.cache/rwkv-int4-notebooks/kernels)")
    api_keys: str | None = _setting("RWKV_API_KEYS", "--api-keys", "comma-separated keys API clients must send "
                                    "(default: none, only for a loopback address)")
    native_library: str | None = _setting("LLAMA_CPP_LIB", "", "the library's: the path of the libllama build to load; "
                                          "set, it wins over RWKV_NATIVE_BUILD")
    chosen_native_library: str | None = _setting("RWKV_CHOSEN_NATIVE_LIBRARY", "", "set by helpers, not by you: the "
                                                 "LLAMA_CPP_LIB it chose, which the processes it starts inherit")
    compiler: str | None = _setting("CC", "", "the C compiler the fused step and the kernel sweep are built with "
                                    "(default: cc, else gcc)")
    omp_threads: int | None = _setting("OMP_NUM_THREADS", "", "OpenMP's: threads of the native kernels and torch")
    cpuinfo: str | None = _setting("RWKV_CPUINFO", "", "a file in /proc/cpuinfo's format read in its place, to run as "
                                   "another CPU would see it, with flags this CPU has (tests/cpus/ holds some)")


SETTINGS = {f.name: f.metadata["setting"] for f in fields(Settings)}  # Settings attribute: Setting
DEFAULTS = Settings()


SWITCH_WORDS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


class BadSetting(UserError):
    """A variable whose text is not a value of its setting; the message names it and what it takes."""


def _parse(name, text):
    default = getattr(DEFAULTS, name)
    if isinstance(default, bool):
        if text.strip().lower() not in SWITCH_WORDS:
            raise BadSetting(f"{SETTINGS[name].variable}={text!r} is not a switch; set it to one of "
                             f"{'/'.join(SWITCH_WORDS)} (any case), or unset it")
        return SWITCH_WORDS[text.strip().lower()]
    kind = Settings.__dataclass_fields__[name].type
    if int in getattr(kind, "__args__", (kind,)):
        return int(text) if text.strip().isdigit() else None
    return text.strip() or default


def read(environ=None):
    """The settings the environment (os.environ, or the mapping given) holds now."""
    environ = os.environ if environ is None else environ
    return Settings(**{name: _parse(name, environ[setting.variable])
                       for name, setting in SETTINGS.items() if setting.variable in environ})


def flag_help(name):
    """A setting's help, naming its variable (as every flag's help does)."""
    setting = SETTINGS[name]
    return f"{setting.help} (env {setting.variable}{'=0' if setting.flag.startswith('--no-') else ''})"


def add_flags(parser, *names):
    """Add to an argparse parser the flags of the settings named, each naming its variable."""
    for name in names:
        flag = SETTINGS[name].flag
        if flag.startswith("--no-"):
            parser.add_argument(flag, dest=name, action="store_const", const=False, help=flag_help(name))
        else:
            parser.add_argument(flag, dest=name, help=flag_help(name))


def from_flags(args, environ=None):
    """The environment's settings with the flags given on the command line in their place."""
    given = {name: getattr(args, name) for name in SETTINGS if getattr(args, name, None) is not None}
    return Settings(**{**read(environ).__dict__, **given})


def variables(settings):
    """{variable: text} of the RWKV_* settings that differ from their defaults, as a child's environment takes them."""
    found = {}
    for name, setting in SETTINGS.items():
        value = getattr(settings, name)
        if setting.flag and value != getattr(DEFAULTS, name):
            found[setting.variable] = ("1" if value else "0") if isinstance(value, bool) else str(value)
    return found


def export(settings):
    """Make this process's RWKV_* variables say what settings say (the processes it starts inherit them)."""
    for setting in SETTINGS.values():
        if setting.flag:
            os.environ.pop(setting.variable, None)
    os.environ.update(variables(settings))


def use_native_library(path):
    """Point the low-bit library (in this process, and the ones it starts) at the libllama build at path, saying that
    helpers chose it (a child that inherits it chooses again; a different LLAMA_CPP_LIB is the user's)."""
    os.environ[SETTINGS["native_library"].variable] = os.environ[SETTINGS["chosen_native_library"].variable] = path


def set_variables(variables):
    """Set {variable: value} in this process's environment (and its children's): another program's settings."""
    os.environ.update(variables)


def keep_fastchat_logs_on_stdout():
    """FastChat writes its logs into files in LOGDIR (default: the current folder) unless it is empty; set
    before fastchat is imported."""
    os.environ.setdefault("LOGDIR", "")


# The fields of FastChat's AppSettings (fastchat.serve.openai_api_server), a pydantic BaseSettings that reads
# them from variables of any case when that module is imported: API_KEYS=secret (as `make serve API_KEYS=...`
# exports it) is not the JSON list it expects, and would stop the API server.
FASTCHAT_APP_SETTINGS = ("controller_address", "api_keys")


def keep_fastchat_app_settings_out_of_the_environment():
    """Remove the variables FastChat's AppSettings would read, before fastchat's API server is imported."""
    for variable in [name for name in os.environ if name.lower() in FASTCHAT_APP_SETTINGS]:
        del os.environ[variable]


def child_environment(**extra):
    """This process's environment with extra added: the environment of a process it starts."""
    return {**os.environ, **{key: str(value) for key, value in extra.items()}}
