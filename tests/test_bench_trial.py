"""scripts/bench_trial.py: one search trial split into merge, evaluation and overhead; its loglikelihood is exact."""

from __future__ import annotations

import json
import math

import pytest
import torch


@pytest.fixture(scope="module")
def bench_trial(load_script):
    return load_script("bench_trial")


def test_trial_times_add_up(tmp_path, one_thread, bench_trial):
    result = bench_trial.main(["--shape", "tiny", "--device", "cpu", "--tokens", "256", "--seq-len", "32", "--batch-size",
                               "4", "--warmup", "1", "--repeats", "2", "--out-dir", str(tmp_path), *one_thread])
    [path] = tmp_path.glob("trial-cpu*-tiny-*.json")
    assert (tmp_path / path.name.replace(".json", ".md")).exists()
    saved = json.loads(path.read_text())
    assert saved["median"] == json.loads(json.dumps(result["median"]))
    assert saved["eval_tokens"] == 256 and len(saved["trials"]) == 2
    for trial in saved["trials"]:
        parts = [trial[f"{k}_seconds"] for k in ("merge", "eval", "overhead")]
        assert all(t > 0 for t in parts)
        assert sum(parts) == pytest.approx(trial["total_seconds"], rel=1e-12)
        assert trial["recomputed"] == trial["tensors"] > 0  # every candidate differs: nothing skipped by the cache
    assert saved["trials"][0]["recipe"] != saved["trials"][1]["recipe"]
    assert math.isfinite(saved["median"]["fitness"])


def test_loglikelihood_matches_float64_reference(bench_trial):
    config = bench_trial.llama_config(bench_trial.SHAPES["tiny"])
    model = bench_trial.eval_model(config, "cpu", torch.float32)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)  # far from uniform next-token distributions
    tokens = bench_trial.token_batches(config.vocab_size, 3 * 16, 16, seed=1, device="cpu")  # one batch: [3, 16]

    with torch.no_grad():
        x = model(tokens).logits.double()[:, :-1]  # logits at t-1 score token t
    log_softmax = x - x.max(-1, keepdim=True).values
    log_softmax = log_softmax - log_softmax.exp().sum(-1, keepdim=True).log()
    reference = log_softmax.gather(-1, tokens[:, 1:, None]).sum().item()

    assert abs(reference + 3 * 15 * math.log(config.vocab_size)) > 1.0  # not the uniform answer
    assert bench_trial.loglikelihood(model, tokens, batch_size=3) == pytest.approx(reference, rel=1e-5)
    assert bench_trial.loglikelihood(model, tokens, batch_size=2) == pytest.approx(reference, rel=1e-5)
