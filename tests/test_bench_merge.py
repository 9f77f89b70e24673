"""scripts/bench_merge.py (the GPU run's first step) end to end on the tiny shape: its bytes, floors and ratios agree."""

from __future__ import annotations

import json

import pytest


def test_bench_merge_table_is_consistent(tmp_path, one_thread, load_script):
    load_script("bench_merge").main(["--shape", "tiny", "--methods", "linear,dare_ties,slerp", "--warmup", "1",
                                     "--repeats", "2", "--out", str(tmp_path), *one_thread])
    [path] = tmp_path.glob("cpu1t-*-tiny-*.json")
    result = json.loads(path.read_text())
    rows = {row["method"]: row for row in result["rows"]}
    assert list(rows) == ["linear", "dare_ties", "slerp"]
    model_bytes = result["params"] * 4  # float32
    # linear and dare_ties read base + 2 experts and write one model; slerp reads two and writes one
    assert rows["linear"]["bytes"] == rows["dare_ties"]["bytes"] == 4 * model_bytes
    assert rows["slerp"]["bytes"] == 3 * model_bytes
    for row in rows.values():
        # timings are only positive here: their order (planning under a candidate's time) is the machine's to upset
        assert row["tensors"] > 0 and row["plan_seconds"] > 0 and row["seconds"] > 0
        assert row["floor_seconds"] == pytest.approx(row["bytes"] / result["bandwidth_bytes_per_s"], rel=1e-12)
        assert row["ratio_to_floor"] == pytest.approx(row["seconds"] / row["floor_seconds"], rel=1e-12)


def test_a_run_cut_short_keeps_the_methods_it_measured(tmp_path, one_thread, load_script, monkeypatch):
    """The files are rewritten after every method (a GPU command past its time limit still returns its rows)."""
    bench = load_script("bench_merge")
    measure = bench.bench_method

    def until_slerp(method, *args):
        if method == "slerp":
            raise KeyboardInterrupt  # as a command killed at its limit
        return measure(method, *args)

    monkeypatch.setattr(bench, "bench_method", until_slerp)
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--shape", "tiny", "--methods", "linear,ties,slerp", "--warmup", "0", "--repeats", "1",
                    "--out", str(tmp_path), *one_thread])
    [path] = tmp_path.glob("cpu1t-*-tiny-*.json")
    assert [row["method"] for row in json.loads(path.read_text())["rows"]] == ["linear", "ties"]
    assert "| ties |" in path.with_suffix(".md").read_text() and not list(tmp_path.glob("*.tmp"))
