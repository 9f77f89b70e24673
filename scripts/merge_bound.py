"""How much of every skill can a merge of the toy experts keep, at a given granularity of merge weights?

A gradient-trained bound, not a search: task arithmetic, theta = base + sum_m w_gm (expert_m - base), with one weight
w_gm in (0, WMAX) per model m and per group g of tensors, the weights trained with Adam on the skills' training data
(the zoo's sampler, never an evaluation input; loss on the answer tokens, as the zoo was trained). The result is the
exact match on the validation split (evomerge.zoo.train.quick_accuracy: greedy decoding is exact iff every answer
token is the argmax). A local optimum from one start: a lower bound on what the granularity allows, and far more
evaluations than a search's budget.

    python scripts/merge_bound.py --groups layer      # the search spaces' granularity: one weight per model per layer
    python scripts/merge_bound.py --groups tensor     # one weight per model per tensor (39 x 3)

Groups: `layer` (tensors of layer i; the embeddings, final norm and head with layer 0, as mergekit reads a gradient
at t = 0 for them), `attn_mlp` (layer x self_attn / mlp / rest), `kind` (q_proj, ..., one group across layers), or
`tensor`. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch.func import functional_call

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evomerge.zoo.skills import EXPERT_SKILLS  # noqa: E402
from evomerge.zoo.tokenizer import PAD  # noqa: E402
from evomerge.zoo.train import Sampler, quick_accuracy  # noqa: E402


def group_of(name: str, groups: str) -> str:
    layer = re.search(r"layers\.(\d+)\.", name)
    if groups == "tensor":
        return name
    if groups == "kind":
        return name.split(".")[-2]
    index = layer.group(1) if layer else "0"
    if groups == "attn_mlp":
        return index + ("self_attn" if "self_attn" in name else "mlp" if "mlp" in name else "rest")
    return index


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", default=str(ROOT / "zoo"))
    parser.add_argument("--groups", choices=["layer", "attn_mlp", "kind", "tensor"], default="layer")
    parser.add_argument("--wmax", type=float, default=1.5, help="weights in (0, wmax): the search spaces' bound")
    parser.add_argument("--init", type=float, default=1.0, help="every weight's start")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
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

    def merged() -> dict[str, torch.Tensor]:
        w = args.wmax * torch.sigmoid(weights_logit)[index]  # [tensors, models]
        return {n: base[n] + sum(w[i, m] * d[n] for m, d in enumerate(deltas)) for i, n in enumerate(names)}

    optimizer = torch.optim.Adam([weights_logit], lr=0.05)
    sampler = Sampler([(s, "true", 1.0) for s in EXPERT_SKILLS], seed=args.seed + 7)
    start = time.perf_counter()
    for _ in range(args.steps):
        ids, labels = sampler.batch(96)
        loss = functional_call(model, merged(), (ids,), {"attention_mask": (ids != PAD).long(), "labels": labels}).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        model.load_state_dict(merged())
        exact = {s: quick_accuracy(model, s)[0] for s in EXPERT_SKILLS}
        mean_weight = (args.wmax * torch.sigmoid(weights_logit)).mean(0).tolist()
    print(json.dumps({"groups": args.groups, "weights": len(groups) * len(deltas), "init": args.init,
                      "steps": args.steps, "seed": args.seed, "validation_exact_match": exact,
                      "mean": sum(exact.values()) / len(exact), "min": min(exact.values()),
                      "mean_weight_per_expert": dict(zip(EXPERT_SKILLS, mean_weight)),
                      "seconds": round(time.perf_counter() - start)}))


if __name__ == "__main__":
    main()
