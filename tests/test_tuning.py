"""Notebook 04 names a winner only beyond the spread of its rounds, and builds the commands from the winners."""
import pytest

from helpers import tuning
from helpers.runtime.cpu import CpuInfo


def measured(**speeds):
    return {label.replace("_", " "): tuning.Measured(list(values)) for label, values in speeds.items()}


def test_a_winner_beats_every_other_round():
    assert tuning.winner(measured(a=[10, 11, 12], b=[13, 14, 15])) == "b"
    assert tuning.winner(measured(a=[10, 11, 13.5], b=[13, 14, 15])) is None  # ranges overlap
    assert "no measurable difference here" in tuning.verdict("threads", measured(a=[1, 2, 3], b=[2, 3, 4]))


@pytest.fixture
def two_sockets(monkeypatch):
    monkeypatch.setattr(tuning, "cpu_info", lambda: CpuInfo("AuthenticAMD", "test", 16, 2, frozenset({"avx2"})))
    monkeypatch.setattr(tuning.shutil, "which", lambda name: None)  # no numactl


def test_commands_follow_the_winners(two_sockets):
    threads = measured(**{"8": [5, 5, 5], "16": [9, 9, 9]})
    runtimes = {name: tuning.Measured([4, 4, 4]) for name in tuning.RUNTIMES}
    runtimes["Intel OpenMP, jemalloc"] = tuning.Measured([8, 8, 8])
    pinning = {"not pinned": tuning.Measured([4, 4, 4]), "taskset -c 0-15": tuning.Measured([7, 7, 7])}
    client, server, notes = tuning.recommended_commands(threads, runtimes, pinning)
    assert client == "source bigdl-llm-init -j\nOMP_NUM_THREADS=16 taskset -c 0-15 python -m helpers.generate"
    assert server.splitlines() == ["source bigdl-llm-init -j",
                                   "OMP_NUM_THREADS=8 taskset -c 0-7 python -m helpers.generate &",
                                   "OMP_NUM_THREADS=8 taskset -c 8-15 python -m helpers.generate &"]
    assert notes == ["not measurable here: numactl (not installed: `apt install numactl`)"]


def test_without_a_winner_the_commands_are_the_plain_default(two_sockets):
    same = [5, 6, 7]
    client, _, _ = tuning.recommended_commands(measured(**{"8": same, "16": same}),
                                               {name: tuning.Measured(same) for name in tuning.RUNTIMES},
                                               measured(not_pinned=same))
    assert client == "OMP_NUM_THREADS=16 python -m helpers.generate"
