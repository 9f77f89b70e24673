"""How much of every skill can a merge of the toy experts keep, at a given granularity of merge weights?

A gradient-trained bound, not a search: task arithmetic, theta = base + sum_m w_gm (expert_m - base), with one weight
w_gm in (0, WMAX) per model m and per group g of tensors, the weights trained with Adam on the skills' training data
(the zoo's sampler, never an evaluation input; loss on the answer tokens, as the zoo was trained). The result is the
exact match on the validation split (evomerge.zoo.train.quick_accuracy: greedy decoding is exact iff every answer
token is the argmax). A local optimum from one start: a lower bound on what the granularity allows, and far more
evaluations than a search's budget.

With `--search niches` (or any optimizer) the same weights are searched instead, in process, `--trials` candidates told
each document's score on the search split's first `--limit` documents per skill: `exact` match (the searches' metric)
or the share of answer `tokens` right (partial credit). Genome order [model][group], as the PS spaces'; the anchors are
each expert alone and all three at weight 1 (the default merge). The winner is the candidate of best fitness.

    python scripts/merge_bound.py --groups layer      # the search spaces' granularity: one weight per model per layer
    python scripts/merge_bound.py --groups tensor     # one weight per model per tensor (39 x 3)
    python scripts/merge_bound.py --groups tensor --search niches --trials 2000

Groups: `layer` (tensors of layer i; the embeddings, final norm and head with layer 0, as mergekit reads a gradient
at t = 0 for them), `attn_mlp` (layer x self_attn / mlp / rest), `layer_kind` (layer x q_proj, ..., the layer's two
norms; the rest with layer 0: what per-layer mergekit filters can express), `kind` (q_proj, ..., one group across
layers), or `tensor`. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch.func import functional_call

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evomerge.optim.registry import OPTIMIZERS, make_optimizer  # noqa: E402
from evomerge.zoo.skills import EXPERT_SKILLS, SKILLS, eval_records  # noqa: E402
from evomerge.zoo.tokenizer import PAD  # noqa: E402
from evomerge.zoo.train import IGNORE, Sampler, quick_accuracy, tensors  # noqa: E402


def group_of(name: str, groups: str) -> str:
    layer = re.search(r"layers\.(\d+)\.", name)
    if groups == "tensor":
        return name
    if groups == "kind":
        return name.split(".")[-2]
    index = layer.group(1) if layer else "0"
    if groups == "attn_mlp":
        return index + ("self_attn" if "self_attn" in name else "mlp" if "mlp" in name else "rest")
    if groups == "layer_kind":
        return index + (name.split(".")[-2] if layer else "rest")
    return index


def document_scores(model, ids: torch.Tensor, labels: torch.Tensor, fitness: str) -> np.ndarray:
    """Each document's score: exact match (every answer token the argmax, as greedy decoding) or the share right."""
    with torch.no_grad():
        right = model(input_ids=ids, attention_mask=(ids != PAD).long()).logits[:, :-1].argmax(-1) == labels[:, 1:]
    answer = labels[:, 1:] != IGNORE
    if fitness == "exact":
        return (right | ~answer).all(1).double().numpy()
    return ((right & answer).sum(1) / answer.sum(1)).double().numpy()


def search(model, merged, shape: tuple[int, int], args) -> tuple[torch.Tensor, float]:
    """The weights [groups, models] of the best of `args.trials` candidates of `args.search`, and its fitness."""
    groups, models = shape
    lower, upper = np.zeros(groups * models), np.full(groups * models, args.wmax)
    default = np.ones(groups * models)  # x0, then each expert alone; genome [model][group]
    anchors = [default] + [np.repeat(np.eye(models)[m], groups) for m in range(models)]
    optimizer = make_optimizer(args.search, lower, upper, seed=args.seed, x0=default, anchors=anchors)
    docs = [(r["prompt"], r["answer"] + "\n") for s in EXPERT_SKILLS for r in eval_records(SKILLS[s])["search"][:args.limit]]
    ids, labels = tensors(docs)
    best, told = (-1.0, None), 0
    while told < args.trials:
        for candidate in optimizer.ask()[:args.trials - told]:
            weights = torch.tensor(candidate.genome, dtype=torch.float32).reshape(models, groups).T
            model.load_state_dict(merged(weights))
            scores = document_scores(model, ids, labels, args.fitness)
            optimizer.tell(candidate.id, float(scores.mean()), scores)
            best, told = max(best, (float(scores.mean()), weights), key=lambda b: b[0]), told + 1
    return best[1], best[0]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", default=str(ROOT / "zoo"))
    parser.add_argument("--groups", choices=["layer", "attn_mlp", "layer_kind", "kind", "tensor"], default="layer")
    parser.add_argument("--wmax", type=float, default=1.5, help="weights in (0, wmax): the search spaces' bound")
    parser.add_argument("--init", type=float, default=1.0, help="every weight's start")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--search", choices=sorted(OPTIMIZERS), help="search the weights instead of training them")
    parser.add_argument("--trials", type=int, default=128)
    parser.add_argument("--fitness", choices=["exact", "tokens"], default="exact")
    parser.add_argument("--limit", type=int, default=50, help="search documents per skill")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)

    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(f"{args.zoo}/base", dtype=torch.float32)
    base = load_file(f"{args.zoo}/base/model.safetensors")
    deltas = [{n: t - base[n] for n, t in load_file(f"{args.zoo}/expert_{s}/model.safetensors").items()}
              for s in EXPERT_SKILLS]
    names = list(base)
    groups = sorted({group_of(n, args.groups) for n in names})
    index = [groups.index(group_of(n, args.groups)) for n in names]
    logit = torch.logit(torch.tensor(args.init / args.wmax))
    weights_logit = torch.nn.Parameter(torch.full((len(groups), len(deltas)), float(logit)))

    def merged(weights: torch.Tensor) -> dict[str, torch.Tensor]:
        w = weights[index]  # [tensors, models]
        return {n: base[n] + sum(w[i, m] * d[n] for m, d in enumerate(deltas)) for i, n in enumerate(names)}

    start = time.perf_counter()
    if args.search:
        weights, fitness = search(model, merged, (len(groups), len(deltas)), args)
        how = {"search": args.search, "trials": args.trials, "fitness": args.fitness, "search_fitness": fitness}
    else:
        optimizer = torch.optim.Adam([weights_logit], lr=0.05)
        sampler = Sampler([(s, "true", 1.0) for s in EXPERT_SKILLS], seed=args.seed + 7)
        for _ in range(args.steps):
            ids, labels = sampler.batch(96)
            loss = functional_call(model, merged(args.wmax * torch.sigmoid(weights_logit)), (ids,),
                                   {"attention_mask": (ids != PAD).long(), "labels": labels}).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        weights = (args.wmax * torch.sigmoid(weights_logit)).detach()
        how = {"init": args.init, "steps": args.steps}
    with torch.no_grad():
        model.load_state_dict(merged(weights))
        exact = {s: quick_accuracy(model, s)[0] for s in EXPERT_SKILLS}
    print(json.dumps({"groups": args.groups, "weights": len(groups) * len(deltas), **how, "seed": args.seed,
                      "validation_exact_match": exact, "mean": sum(exact.values()) / len(exact),
                      "min": min(exact.values()), "mean_weight_per_expert": dict(zip(EXPERT_SKILLS, weights.mean(0).tolist())),
                      "seconds": round(time.perf_counter() - start)}))


if __name__ == "__main__":
    main()
