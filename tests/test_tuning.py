"""Notebook 04 names a winner only beyond the spread of its rounds and the reference's drift, and builds the
commands from the winners, for this machine or for one described."""
import pytest

from helpers.lessons import tuning
from helpers.runtime import library
from helpers.runtime.cpu import CpuInfo

TWO_SOCKETS = CpuInfo("AuthenticAMD", "test", 16, 2, frozenset({"avx2"}))


def measured(**speeds):
    return {label.replace("_", " "): tuning.Measured(list(values)) for label, values in speeds.items()}


def test_a_winner_beats_every_other_round():
    assert tuning.winner(measured(a=[10, 11, 12], b=[13, 14, 15])) == "b"
    assert tuning.winner(measured(a=[10, 11, 13.5], b=[13, 14, 15])) is None  # ranges overlap
    assert "no measurable difference between the best two here" in tuning.verdict("threads", measured(a=[1, 2, 3], b=[2, 3, 4]))


def test_a_winner_leads_by_more_than_the_reference_moved():
    # b leads a by 27% (14 against 11) and its rounds do not overlap a's, but the reference, the same
    # configuration every time, moved (14 - 10) / 12 = 33% over the same rounds:
    drifting = {tuning.REFERENCE: tuning.Measured([10, 12, 14]), **measured(a=[10, 11, 12], b=[13, 14, 15])}
    assert tuning.winner(drifting) is None
    assert "b, 27% ahead" in tuning.verdict("threads", drifting) and "moved 33%" in tuning.verdict("threads", drifting)
    steady = {tuning.REFERENCE: tuning.Measured([10, 10.5, 11]), **measured(a=[10, 11, 12], b=[13, 14, 15])}
    assert tuning.winner(steady) == "b"
    fastest_reference = {tuning.REFERENCE: tuning.Measured([90, 90, 90]), **measured(a=[10, 10, 10], b=[20, 20, 20])}
    assert tuning.winner(fastest_reference) == "b"  # the reference is a yardstick, never a candidate


def test_drift_rows_compare_the_reference_across_sections():
    sections = {"threads": {tuning.REFERENCE: tuning.Measured([100, 110, 120])},
                "pinning": {tuning.REFERENCE: tuning.Measured([70, 75, 80])}}
    assert tuning.drift_rows(sections) == [("threads", "110.0 tokens/s", "100.0 to 120.0"),
                                           ("pinning", "75.0 tokens/s", "70.0 to 80.0"),
                                           ("across sections", "75.0 to 110.0", "47% apart")]


def test_commands_follow_the_choices():
    client, server, notes = tuning.recommended_commands(16, "Intel OpenMP, jemalloc", "taskset -c 0-15",
                                                        info=TWO_SOCKETS, numactl=False)
    init = library.init_script()
    assert client == f"source {init} -j\nOMP_NUM_THREADS=16 taskset -c 0-15 python -m helpers.tools.generate"
    assert server.splitlines() == [f"source {init} -j", "python -m helpers.serving --workers 2 --port 8000"]
    assert notes == ["numactl is not installed (`apt install numactl`): each worker is pinned to its socket's cores, "
                     "but its memory is not placed on that socket"]
    _, server, notes = tuning.recommended_commands(8, info=TWO_SOCKETS, numactl=True)
    assert server.splitlines()[1:3] == [
        f"numactl --cpunodebind={socket} --membind={socket} python -m helpers.serving.worker --controller-address "
        f"http://127.0.0.1:21001 --port {21002 + socket} &" for socket in (0, 1)]
    assert server.splitlines()[-1].startswith("python -m helpers.serving.api_server ") and notes == []


def test_one_socket_says_what_sets_the_server_apart():
    client, server, notes = tuning.recommended_commands(2, info=CpuInfo("GenuineIntel", "test", 2, 1, frozenset()),
                                                        numactl=True)
    assert client == "OMP_NUM_THREADS=2 python -m helpers.tools.generate"
    assert server == "python -m helpers.serving --workers 1 --port 8000"
    assert any("one socket" in note and "many users' sequences" in note for note in notes)


def test_a_verdict_sets_each_configuration_against_the_reference():
    lines = tuning.verdict("kernels", {tuning.REFERENCE: tuning.Measured([100, 101, 102]),
                                       **measured(fused=[99, 101, 103], torch=[18, 19, 20])}).splitlines()
    assert lines[0].startswith("kernels: fused is fastest here")
    assert lines[1:] == ["  fused: 1.00x as fast as the reference, within the spread",
                         "  torch: 5.3x slower than the reference, beyond the spread"]
    assert "  b: 1.27x faster than the reference" in tuning.verdict("threads", {tuning.REFERENCE: tuning.Measured([11, 11, 11]),
                                                                             **measured(b=[13, 14, 15])})


@pytest.fixture
def sixteen_cores(monkeypatch):
    monkeypatch.setattr(tuning, "cpu_info", lambda: TWO_SOCKETS)


def test_choices_come_from_the_winners_else_the_defaults(sixteen_cores):
    runtimes = {name: tuning.Measured([4, 4, 4]) for name in tuning.RUNTIMES}
    runtimes["Intel OpenMP, jemalloc"] = tuning.Measured([8, 8, 8])
    choices = tuning.measured_choices(measured(**{"8": [5, 5, 5], "16": [9, 9, 9]}), runtimes,
                                      measured(not_pinned=[4, 4, 4], **{"taskset -c 0-15": [7, 7, 7]}))
    assert choices == (16, "Intel OpenMP, jemalloc", "taskset -c 0-15")
    same = [5, 6, 7]
    assert tuning.measured_choices(measured(**{"8": same, "16": same}), {name: tuning.Measured(same) for name in tuning.RUNTIMES},
                                   measured(not_pinned=same)) == (16, None, None)


def test_the_two_socket_server_of_the_committed_sweep():
    sweep = tuning.kernel_sweeps()[-1]
    server = tuning.two_socket_server(sweep)
    assert (server.sockets, server.physical_cores) == (2, 2 * sweep["provenance"]["machine"]["physical_cores"])
    fastest = min(sweep["records"], key=lambda record: record["kernel_ms"])
    assert tuning.fastest_threads(sweep) == fastest["threads"]
    assert ("older kernel" in tuning.sweep_caption(sweep)) != sweep["current"]  # a stale sweep says so


def test_a_configuration_s_shell_line_sets_what_its_process_gets():
    line = tuning.shell_line(2, {"RWKV_FUSED_KERNEL": "avx2"}, ("taskset", "-c", "0-1"), init="-t")
    assert line == f"source {library.init_script()} -t; RWKV_FUSED_KERNEL=avx2 OMP_NUM_THREADS=2 taskset -c 0-1 python my_script.py"
    assert tuning.shell_line(4) == "OMP_NUM_THREADS=4 python my_script.py"
    assert tuning.shell_line(1, init="").startswith(f"source {library.init_script()}; ")
