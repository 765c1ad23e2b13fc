import json

import pytest

from conftest import run_cli, table_rows
import torch

from helpers.measure import provenance
from helpers.measure import checkpoints, reports, results
from helpers.runtime import fused_decode
from helpers.runtime.paths import DATA_DIR, REPO_ROOT
from helpers.tools import side_by_side

KEYS = {"option", "load_s", "peak_load_rss_gib", "steady_rss_gib", "huge_pages_gib", "prefill_ms", "first_prefill_ms",
        "decode_ms", "bound_ms", "best_bound_ms", "multiply_add_bound_ms", "weight_bytes"}


def test_bench_prints_a_table_and_writes_records(tmp_path):
    records_file, plot_file = tmp_path / "bench.json", tmp_path / "bench.png"
    result = run_cli("helpers.tools.bench", "--shape", "tiny",
                     "--options", "hf_fp32,sym_int4,sym_int4_unfused,sym_int4_from_pretrained",
                     "--threads", "1",
                     "--json", str(records_file), "--plot", str(plot_file))
    assert result.returncode == 0, result.stderr
    run = json.loads(records_file.read_text())
    records, made = run["records"], run["provenance"]
    assert made["fingerprint"] == provenance.fingerprint("decoding") and made["threads"] == 1
    assert made["machine"]["physical_cores"] >= 1 and made["machine"]["cpu"] in result.stdout  # the table names it
    low, high = made["read_bandwidth_gbs"]
    assert 0 < low <= high and made["command"].startswith("python -m helpers.tools.bench --shape tiny")
    options = [row[0] for row in table_rows(result.stdout)]
    assert "hf_fp32" in options and reports.label(records[1]) in options
    assert [r["option"] for r in records] == ["hf_fp32", "sym_int4", "sym_int4_unfused", "sym_int4_from_pretrained"]
    for record in records:
        assert KEYS <= record.keys()
        assert record["decode_ms"] > 0 and len(record["tokens"]) == 64
        assert 0 < record["best_bound_ms"] and 1 < record["bandwidth_gbs"] < 2000  # a read bandwidth a machine has
    fp32, int4, unfused, from_pretrained = records
    assert int4["fused_decode"] == (fused_decode.library() is not None) and not unfused["fused_decode"]
    assert int4["kernel"] == (fused_decode.kernel_name(fused_decode.library()) if int4["fused_decode"] else None)
    assert int4["tokens"] == from_pretrained["tokens"]  # the same weights, loaded two ways
    if int4["fused_decode"]:  # a token's multiply-adds alone take part of its time; the torch path has no such figure
        assert 0 < int4["multiply_add_bound_ms"] < int4["decode_ms"] and unfused["multiply_add_bound_ms"] is None
    assert int4["peak_load_rss_gib"] < from_pretrained["peak_load_rss_gib"] - 0.05  # no whole fp16 model in memory
    # The bound's weights, counted from the checkpoint's own tensor list (not from the loaded model, as bench does):
    # every weight matrix but the embeddings, 4 bytes each in FP32, a block of 64 in 34 bytes in sym_int4.
    linears = sum(torch.Size(shape).numel() for name, shape in checkpoints.tensor_shapes(checkpoints.make_config("tiny"))
                  if len(shape) == 2 and "embeddings" not in name)
    assert (fp32["weight_bytes"], int4["weight_bytes"]) == (4 * linears, linears // 64 * 34)
    assert plot_file.read_bytes()[:4] == b"\x89PNG"


def test_bench_reads_the_hub_layout_and_its_cache(tmp_path):
    records_file = tmp_path / "bench.json"
    result = run_cli("helpers.tools.bench", "--shape", "tiny", "--layout", "hub", "--options", "sym_int4,sym_int4_cache",
                     "--threads", "1", "--json", str(records_file), "--batch", "4,1")
    assert result.returncode == 0, result.stderr
    assert "Shape tiny (hub layout)" in result.stdout
    from_bin, from_cache = json.loads(records_file.read_text())["records"]
    assert f"{reports.label(from_bin)}: load peak " in result.stdout and f"{reports.label(from_cache)}: load peak " in result.stdout
    assert from_bin["layout"] == from_cache["layout"] == "hub"
    assert from_bin["tokens"] == from_cache["tokens"]  # the cache holds the same weights
    assert [reports.label(from_bin), "4"] in [row[:2] for row in table_rows(result.stdout)]
    for record in (from_bin, from_cache):
        assert [b["batch"] for b in record["batches"]] == [1, 4]
        assert all(b["same_tokens_as_alone"] == 1.0 and b["aggregate_tokens_per_s"] > 0 for b in record["batches"])


def test_a_peak_is_the_measuring_process_own():
    """Memory the process that starts the measuring worker used (bench's builds a missing checkpoint first) does
    not count in the worker's load peak: 2.5 GiB touched here, the tiny load's peak far less."""
    from helpers.runtime.memory import GIB, peak_rss_bytes
    from helpers.tools.bench import run_worker

    touched = torch.ones(int(2.5 * GIB) // 4)
    del touched
    assert peak_rss_bytes() > 2.5 * GIB
    record = run_worker("sym_int4", "tiny", threads=1)
    assert record["steady_rss_gib"] * 0.9 <= record["peak_load_rss_gib"] < peak_rss_bytes() / GIB - 1


def test_bench_rejects_bad_batch_sizes():
    result = run_cli("helpers.tools.bench", "--shape", "tiny", "--batch", "4,x")
    assert result.returncode == 2 and "--batch takes batch sizes separated by commas" in result.stderr


def test_bench_rejects_an_unknown_kernel():
    result = run_cli("helpers.tools.bench", "--shape", "tiny", "--kernel", "avx512,sse")
    assert result.returncode == 2 and "unknown kernel sse; choose from auto, avx512, avxvnni, avx2" in result.stderr


def test_targets_say_what_each_run_met():
    def record(option, kernel, decode_ms, bound_ms, prefill_ms, batches=(), multiply_add_bound_ms=None):
        return {"option": option, "kernel": kernel, "decode_ms": decode_ms, "bound_ms": bound_ms,
                "prefill_ms": prefill_ms, "batches": list(batches), "multiply_add_bound_ms": multiply_add_bound_ms}

    batch = lambda size, tokens_per_s, same=1.0: {"batch": size, "aggregate_tokens_per_s": tokens_per_s,  # noqa: E731
                                                  "same_tokens_as_alone": same}
    table = reports.targets_table({"records": [
        record("sym_int4", "avx2", 26.0, 20.0, 300, [batch(1, 40), batch(8, 150)], multiply_add_bound_ms=16.0),
        record("sym_int8", "avx512", 55.0, 40.0, 200, [batch(1, 20), batch(8, 100, same=0.875)]),
        record("sym_int4_unfused", None, 40.0, 20.0, 800),
    ]})
    rows = table_rows(table)
    avx2_decode = "sym_int4 decode, avx2 build: at most 1.25x the larger of its bound and its multiply-add bound"
    assert [avx2_decode, "26.0 / 20.0 ms = 1.30x", "no"] in rows
    compute_bound = reports.targets_table({"records": [record("sym_int4", "avx2", 26.0, 20.0, 300, multiply_add_bound_ms=24.0)]})
    assert [avx2_decode, "26.0 / 24.0 ms = 1.08x", "yes"] in table_rows(compute_bound)
    assert ["sym_int4 prefill (32 tokens), avx2 build: at most half the torch path's", "300 / 800 ms = 0.38", "yes"] in rows
    assert ["sym_int8 (avx512) decode: at most 1.25x its bound", "1.38x", "no"] in rows
    assert any(row[0].startswith("sym_int4 (avx2), batch 8") and row[1:] == ["3.75x, 100% of sequences", "yes"] for row in rows)
    assert any(row[0].startswith("sym_int8 (avx512), batch 8") and row[1:] == ["5.00x, 88% of sequences", "no"] for row in rows)


def test_side_by_side_times_the_options_in_alternating_rounds(tmp_path):
    run_file = tmp_path / "rounds.json"
    result = run_cli("helpers.tools.side_by_side", "--shape", "tiny", "--options", "sym_int4,sym_int4_head8",
                     "--rounds", "2", "--threads", "1", "--json", str(run_file))
    assert result.returncode == 0, result.stderr
    run = json.loads(run_file.read_text())
    assert provenance.is_current(run["provenance"]) and run["provenance"]["command"].startswith("python -m helpers.tools.side")
    plain, mix = run["records"]
    assert (plain["option"], mix["option"]) == ("sym_int4", "sym_int4_head8")
    assert len(plain["decode_ms"]) == len(mix["decode_ms"]) == 2 and min(plain["decode_ms"] + mix["decode_ms"]) > 0
    config = checkpoints.make_config("tiny")  # the head in sym_int8: 68 bytes a block of 64 where sym_int4 has 34
    assert mix["weight_bytes"] - plain["weight_bytes"] == config["vocab_size"] * config["hidden_size"] // 64 * (68 - 34)
    rows = {row[0]: row for row in table_rows(result.stdout)}
    assert rows["sym_int4"][2] == "1.000x (1.000 to 1.000)" and rows["sym_int4"][-1] == "yes"
    ratios = [mine / theirs for mine, theirs in zip(mix["decode_ms"], plain["decode_ms"])]
    assert rows["sym_int4_head8"][2].startswith(f"{sum(ratios) / 2:.3f}x ({min(ratios):.3f} to {max(ratios):.3f})")


def test_side_by_side_needs_two_options(capsys):
    with pytest.raises(SystemExit) as stopped:
        side_by_side.main(["--options", "sym_int4,sym_int4"])
    assert stopped.value.code == 2 and "--options takes two or more different options" in capsys.readouterr().err


def committed_runs():
    return sorted(path.stem for path in (DATA_DIR / "bench").glob("*.json"))


@pytest.mark.parametrize("name", committed_runs())
def test_every_committed_run_was_measured_with_this_code(name):
    """A kernel or loader change (a serving change, for a serving run) makes this fail until the run is redone."""
    run = json.loads((DATA_DIR / "bench" / f"{name}.json").read_text())
    assert provenance.is_current(run["provenance"]), provenance.check_current(run["provenance"], f"data/bench/{name}.json")


def test_a_run_of_other_code_is_refused(tmp_path, monkeypatch):
    (tmp_path / "bench").mkdir()
    run = json.loads((DATA_DIR / "bench" / "1b5-hub.json").read_text())
    run["provenance"]["fingerprint"] = "0" * 16
    (tmp_path / "bench" / "old.json").write_text(json.dumps(run))
    monkeypatch.setattr(results, "DATA_DIR", tmp_path)
    with pytest.raises(provenance.StaleResults, match="rerun `python -m helpers.tools.bench --shape 1b5"):
        reports.render("old", "summary")


@pytest.mark.parametrize("markdown", ["README.md", "docs/benchmarks.md", "docs/serving.md", "docs/quality.md", "data/bench/README.md"])
def test_rendered_tables_are_their_runs(markdown):
    """Each table between rendered markers is what its committed run renders now (python -m helpers.tools.bench --refresh)."""
    blocks = reports.rendered_blocks((REPO_ROOT / markdown).read_text())
    assert blocks
    for name, kind, text in blocks:
        stale = f"{markdown}: {name} {kind} is stale: python -m helpers.tools.bench --refresh {markdown}"
        assert text == reports.render(name, kind), stale
        # its caption names the machine and the date (data/quality/README.md names those of a quality run)
        assert "Measured 20" in text or kind in ("kinds", "libraries", "quality")


def test_an_empty_rendered_block_is_filled_without_touching_the_text_after_it(tmp_path):
    block = "<!-- rendered: 169m-hub summary -->\n{}<!-- /rendered -->\n"
    path = tmp_path / "page.md"
    path.write_text(block.format("") + "text between\n" + block.format("an old table\n"))
    reports.refresh(path)
    table = reports.render("169m-hub", "summary")
    assert path.read_text() == block.format(table + "\n") + "text between\n" + block.format(table + "\n")


def test_a_percentile_interpolates_as_numpy_does():
    """numpy's default (linear) percentile is the independent reference for the measuring layer's own."""
    import numpy
    import random

    from helpers.measure.client import percentile

    draw = random.Random(7)
    values = [draw.lognormvariate(4, 1) for _ in range(41)]
    for share in (0.05, 0.5, 0.95, 0.99):
        assert percentile(values, share) == pytest.approx(numpy.percentile(values, share * 100))
    assert percentile([3.0], 0.99) == 3.0 and percentile([], 0.5) != percentile([], 0.5)  # NaN for none


def test_the_last_level_cache_counts_each_instance_once(tmp_path):
    from helpers.measure.bandwidth import last_level_cache_bytes, last_level_caches

    def cache(cpu, index, level, size, shared):
        folder = tmp_path / f"cpu{cpu}" / "cache" / f"index{index}"
        folder.mkdir(parents=True)
        for name, text in (("level", level), ("size", size), ("shared_cpu_list", shared)):
            (folder / name).write_text(f"{text}\n")

    for cpu in range(4):  # two L3 instances of 32 MiB, each shared by two CPUs; an L2 of each CPU's own
        cache(cpu, 2, 2, "1024K", cpu)
        cache(cpu, 3, 3, "32768K", "0-1" if cpu < 2 else "2-3")
    assert last_level_cache_bytes(tmp_path) == 64 * 2**20 and last_level_caches(tmp_path) == [32 * 2**20] * 2
    assert last_level_cache_bytes(tmp_path / "none") == 0 and last_level_caches(tmp_path / "none") == []


def test_the_step_timers_take_every_place_once_in_as_many_rounds():
    from helpers.tools.load_test import in_turn

    timers = {"main": None, "long-lived": None, "new": None}
    orders = [[key for key, _ in in_turn(timers, round_index)] for round_index in range(3)]
    assert all(sorted(order) == sorted(timers) for order in orders)
    assert all(len({order[place] for order in orders}) == 3 for place in range(3))


def test_the_serving_line_sets_each_round_against_its_own_step_and_the_thread_against_the_main_thread():
    from helpers.measure.client import LoadResult

    rounds = [LoadResult(16, tokens=800, seconds=10.0), LoadResult(16, tokens=900, seconds=10.0)]  # 80 and 90 tokens/s
    settings = {"step_tokens_per_s": [100.0, 120.0], "step_in_thread_tokens_per_s": [100.0, 100.0],
                "step_in_long_lived_thread_tokens_per_s": [100.0, 120.0]}
    line = reports.step_line(settings, rounds, targets=True)
    assert "0.75x to 0.80x the batched step alone (median 0.78x; the step: 110 tokens/s" in line
    assert "target at least 0.85x: missed" in line
    assert line.endswith("the step took 1.00x (1.00x to 1.00x) in a thread that ran it every round, as the worker's "
                         "model thread does; 1.10x (1.00x to 1.20x) in a new thread started for it")
    del settings["step_in_long_lived_thread_tokens_per_s"]  # the runs before measured a new thread only
    assert reports.step_line(settings, rounds).endswith("the step took 1.10x (1.00x to 1.20x) in a new thread started for it")
    assert "thread" not in reports.step_line({"step_tokens_per_s": [100.0, 120.0]}, rounds)
