"""scripts/merge_bound.py on the tiny zoo: untrained, it scores plain task arithmetic; its groups are the granularity."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file


def run(load_script, capsys, *args) -> dict:
    load_script("merge_bound").main(list(map(str, args)))
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_untrained_weights_of_one_score_task_arithmetic(tiny_zoo, load_script, capsys):
    from transformers import LlamaForCausalLM

    from evomerge.zoo.skills import EXPERT_SKILLS
    from evomerge.zoo.train import quick_accuracy

    result = run(load_script, capsys, "--zoo", tiny_zoo, "--steps", 0, "--init", 1.0)
    base = load_file(tiny_zoo / "base" / "model.safetensors")
    experts = [load_file(tiny_zoo / f"expert_{s}" / "model.safetensors") for s in EXPERT_SKILLS]
    model = LlamaForCausalLM.from_pretrained(tiny_zoo / "base", dtype=torch.float32)
    with torch.no_grad():
        model.load_state_dict({n: base[n] + sum(e[n] - base[n] for e in experts) for n in base})
        expected = {s: quick_accuracy(model, s)[0] for s in EXPERT_SKILLS}
    assert result["validation_exact_match"] == pytest.approx(expected, abs=0.011)  # weights 1 up to a sigmoid's rounding
    assert result["mean_weight_per_expert"] == pytest.approx({s: 1.0 for s in EXPERT_SKILLS})


@pytest.mark.parametrize("groups, per_expert", [("layer", 2), ("attn_mlp", 6), ("tensor", None)])
def test_groups_set_the_number_of_weights_and_training_moves_them(tiny_zoo, load_script, capsys, groups, per_expert):
    result = run(load_script, capsys, "--zoo", tiny_zoo, "--steps", 3, "--groups", groups)
    tensors = len(load_file(tiny_zoo / "base" / "model.safetensors"))
    assert result["weights"] == 3 * (per_expert or tensors)  # tiny zoo: 2 layers, 3 experts
    assert result["mean_weight_per_expert"] != pytest.approx({s: 1.0 for s in result["mean_weight_per_expert"]})
