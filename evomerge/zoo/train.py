"""Training the zoo's models: a small Llama, batches of skill examples, loss on the answer tokens only.

A data mixture is a list of (skill, mode, weight): mode "true" trains the skill's answers, mode "noise" its format with
random answers of the right shape (see skills.py). Batches are drawn from a seeded random.Random, so a run is a pure
function of (initial weights, mixture, settings, seed).
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass

import torch

from evomerge.zoo.skills import SKILLS, eval_records, example, held_out
from evomerge.zoo.tokenizer import BOS, EOS, PAD, VOCAB, encode

IGNORE = -100  # label of prompt and padding tokens


@dataclass(frozen=True)
class ModelSize:
    hidden: int
    layers: int
    heads: int
    intermediate: int


def llama_config(size: ModelSize):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(VOCAB), hidden_size=size.hidden, intermediate_size=size.intermediate,
                       num_hidden_layers=size.layers, num_attention_heads=size.heads, num_key_value_heads=size.heads,
                       max_position_embeddings=32, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
                       tie_word_embeddings=False)


def new_model(size: ModelSize, seed: int):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(size))


class Sampler:
    """Draws training batches from a mixture [(skill name, "true" | "noise", weight)], skipping evaluation inputs."""

    def __init__(self, mixture: list[tuple[str, str, float]], seed: int):
        self.mixture, self.rng = mixture, random.Random(seed)
        self.held_out = {name: held_out(SKILLS[name]) for name, _, _ in mixture}

    def texts(self, n: int) -> list[tuple[str, str]]:
        picks = self.rng.choices(self.mixture, weights=[w for _, _, w in self.mixture], k=n)
        out = []
        for name, mode, _ in picks:
            skill = SKILLS[name]
            x = skill.sample_input(self.rng)
            while x in self.held_out[name]:
                x = skill.sample_input(self.rng)
            out.append(example(skill, x, skill.noise(self.rng, x) if mode == "noise" else None))
        return out

    def batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return tensors(self.texts(n))


@dataclass(frozen=True)
class TrainSettings:
    steps: int
    lr: float
    optimizer: str = "adamw"  # "adamw" or "sgd" (momentum 0.9)
    batch: int = 128
    warmup: float = 0.1       # fraction of steps with a linear warmup; cosine decay after it
    seed: int = 0


def train(model, mixture: list[tuple[str, str, float]], settings: TrainSettings, log=None) -> float:
    """Train `model` in place; returns seconds taken."""
    sampler = Sampler(mixture, settings.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    if settings.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=settings.lr, betas=(0.9, 0.98), weight_decay=0.0)
    else:
        opt = torch.optim.SGD(params, lr=settings.lr, momentum=0.9)
    warm = max(1, int(settings.warmup * settings.steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * s / settings.steps)))
    model.train()
    start = time.perf_counter()
    for step in range(settings.steps):
        ids, labels = sampler.batch(settings.batch)
        loss = model(input_ids=ids, attention_mask=(ids != PAD).long(), labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        schedule.step()
        opt.zero_grad(set_to_none=True)
        if log and (step + 1) % max(1, settings.steps // 4) == 0:
            log(f"step {step + 1}/{settings.steps} loss {loss.item():.3f} ({time.perf_counter() - start:.0f}s)")
    model.eval()
    return time.perf_counter() - start


@torch.no_grad()
def quick_accuracy(model, skill_name: str, split: str = "validation", n: int = 100) -> tuple[float, float]:
    """(exact match, multiple-choice accuracy) on the first n documents of a split, in two forward passes.

    Greedy decoding is exactly right iff every answer token is the argmax given the right prefix, so exact match needs
    no generation loop. For the build's progress lines and manifest; lm-eval gives the reported numbers.
    """
    rows = eval_records(SKILLS[skill_name])[split][:n]
    em_ids, em_labels = tensors([(r["prompt"], r["answer"] + "\n") for r in rows])
    pred = model(input_ids=em_ids, attention_mask=(em_ids != PAD).long()).logits[:, :-1].argmax(-1)
    target = em_labels[:, 1:]
    em = ((pred == target) | (target == IGNORE)).all(1).float().mean().item()
    pairs = [(r["prompt"], c) for r in rows for c in r["choices"]]
    ids, labels = tensors(pairs)
    logp = torch.log_softmax(model(input_ids=ids, attention_mask=(ids != PAD).long()).logits[:, :-1].float(), -1)
    target = labels[:, 1:]
    ll = (logp.gather(-1, target.clamp(min=0)[..., None])[..., 0] * (target != IGNORE)).sum(1)
    picked = ll.view(len(rows), -1).argmax(1)
    mc = (picked == torch.tensor([r["label"] for r in rows])).float().mean().item()
    return em, mc


def tensors(pairs: list[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids (<s> prompt completion, right-padded) and labels (the completion; prompt and padding ignored)."""
    rows = [([BOS] + encode(p), encode(a)) for p, a in pairs]
    width = max(len(p) + len(a) for p, a in rows)
    ids, labels = torch.full((len(rows), width), PAD), torch.full((len(rows), width), IGNORE)
    for i, (p, a) in enumerate(rows):
        ids[i, : len(p) + len(a)] = torch.tensor(p + a)
        labels[i, len(p): len(p) + len(a)] = torch.tensor(a)
    return ids, labels
