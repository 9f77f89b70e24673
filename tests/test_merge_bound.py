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


@pytest.mark.parametrize("groups, per_expert", [("layer", 2), ("attn_mlp", 6), ("layer_kind", 19), ("tensor", None)])
def test_groups_set_the_number_of_weights_and_training_moves_them(tiny_zoo, load_script, capsys, groups, per_expert):
    result = run(load_script, capsys, "--zoo", tiny_zoo, "--steps", 3, "--groups", groups)
    tensors = len(load_file(tiny_zoo / "base" / "model.safetensors"))
    assert result["weights"] == 3 * (per_expert or tensors)  # tiny zoo: 2 layers, 3 experts
    assert result["mean_weight_per_expert"] != pytest.approx({s: 1.0 for s in result["mean_weight_per_expert"]})



def test_search_keeps_the_best_of_its_candidates(tiny_zoo, load_script, capsys):
    """Natural niches asks its anchors first: all three experts at weight 1, then each expert alone. Fitness `tokens`:
    the share of each answer's tokens (its final newline included) that are the argmax after the right prefix."""
    from transformers import LlamaForCausalLM

    from evomerge.zoo.skills import EXPERT_SKILLS, SKILLS, eval_records
    from evomerge.zoo.tokenizer import BOS, encode

    result = run(load_script, capsys, "--zoo", tiny_zoo, "--search", "niches", "--trials", 4, "--limit", 5,
                 "--fitness", "tokens")
    base = load_file(tiny_zoo / "base" / "model.safetensors")
    experts = [load_file(tiny_zoo / f"expert_{s}" / "model.safetensors") for s in EXPERT_SKILLS]
    model = LlamaForCausalLM.from_pretrained(tiny_zoo / "base", dtype=torch.float32)
    anchors = ([1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0])
    fitness = []
    with torch.no_grad():
        for weights in anchors:
            model.load_state_dict({n: base[n] + sum(w * (e[n] - base[n]) for w, e in zip(weights, experts)) for n in base})
            shares = []
            for skill in EXPERT_SKILLS:
                for row in eval_records(SKILLS[skill])["search"][:5]:  # one document at a time, no padding
                    prompt, answer = [BOS] + encode(row["prompt"]), encode(row["answer"] + "\n")
                    predicted = model(torch.tensor([prompt + answer])).logits[0].argmax(-1).tolist()
                    shares.append(sum(predicted[len(prompt) - 1 + k] == a for k, a in enumerate(answer)) / len(answer))
            fitness.append(sum(shares) / len(shares))
    assert max(fitness) > 0 and fitness.count(max(fitness)) == 1
    assert result["search_fitness"] == pytest.approx(max(fitness))
    best = dict(zip(EXPERT_SKILLS, anchors[fitness.index(max(fitness))]))
    assert result["mean_weight_per_expert"] == pytest.approx(best)
