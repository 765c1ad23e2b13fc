import json

from conftest import run_cli
from helpers.runtime import fused_decode

KEYS = {"option", "load_s", "peak_load_rss_gib", "steady_rss_gib", "prefill_ms", "decode_ms", "bound_ms", "best_bound_ms",
        "weight_bytes"}


def test_bench_prints_a_table_and_writes_records(tmp_path):
    records_file, plot_file = tmp_path / "bench.json", tmp_path / "bench.png"
    result = run_cli("helpers.bench", "--shape", "tiny", "--options", "hf_fp32,sym_int4,sym_int4_unfused,sym_int4_from_pretrained",
                     "--threads", "1",
                     "--json", str(records_file), "--plot", str(plot_file))
    assert result.returncode == 0, result.stderr
    assert "| hf_fp32 |" in result.stdout and "| sym_int4 |" in result.stdout
    records = json.loads(records_file.read_text())
    assert [r["option"] for r in records] == ["hf_fp32", "sym_int4", "sym_int4_unfused", "sym_int4_from_pretrained"]
    for record in records:
        assert KEYS <= record.keys()
        assert record["decode_ms"] > 0 and len(record["tokens"]) == 64
        assert 0 < record["best_bound_ms"] <= record["bound_ms"]  # the best read is at least the median one
    fp32, int4, unfused, from_pretrained = records
    assert int4["fused_decode"] == (fused_decode.library() is not None) and not unfused["fused_decode"]
    assert int4["tokens"] == from_pretrained["tokens"]  # the same weights, loaded two ways
    assert int4["peak_load_rss_gib"] < from_pretrained["peak_load_rss_gib"] - 0.05  # no whole fp16 model in memory
    assert int4["weight_bytes"] < fp32["weight_bytes"] / 6  # 4.25 bits per weight against 32
    assert plot_file.read_bytes()[:4] == b"\x89PNG"


def test_bench_reads_the_hub_layout_and_its_cache(tmp_path):
    records_file = tmp_path / "bench.json"
    result = run_cli("helpers.bench", "--shape", "tiny", "--layout", "hub", "--options", "sym_int4,sym_int4_cache",
                     "--threads", "1", "--json", str(records_file), "--batch", "4,1")
    assert result.returncode == 0, result.stderr
    assert "Shape tiny (hub layout)" in result.stdout
    assert "sym_int4: load peak " in result.stdout and "sym_int4_cache: load peak " in result.stdout
    from_bin, from_cache = json.loads(records_file.read_text())
    assert from_bin["layout"] == from_cache["layout"] == "hub"
    assert from_bin["tokens"] == from_cache["tokens"]  # the cache holds the same weights
    assert "| sym_int4 | 4 |" in result.stdout
    for record in (from_bin, from_cache):
        assert [b["batch"] for b in record["batches"]] == [1, 4]
        assert all(b["same_tokens_as_alone"] == 1.0 and b["aggregate_tokens_per_s"] > 0 for b in record["batches"])


def test_bench_rejects_bad_batch_sizes():
    result = run_cli("helpers.bench", "--shape", "tiny", "--batch", "4,x")
    assert result.returncode == 2 and "--batch takes batch sizes separated by commas" in result.stderr
