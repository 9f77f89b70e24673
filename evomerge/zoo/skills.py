"""The zoo's synthetic skills, their prompts, and their evaluation data.

Every example is one line, `"<tag> <input>=<answer>\\n"`, e.g. `"rev abc=cba\\n"`. The skills (3-character inputs):

    cipher   sub abc=qwe   a fixed letter-substitution cipher (a second "language")
    reverse  rev abc=cba   reverse the letters
    digits   inc 479=580   add one to every digit, mod 10 (single-digit arithmetic)
    upper    upc abc=ABC   upper-case the letters (the distractor: a skill nobody asks for)
    copy     cpy abc=abc   pretraining only: gives the base the copy circuits every skill builds on
    compose  sub rev abc=  cipher of the reversed word: two experts' skills in one question (stretch metric)

`noise(rng, x)` draws an answer of the right shape from the marginal of the skill's answers (the base model learns the
formats from these, so it knows what an answer looks like but not which one is right); multiple-choice distractors come
from the same distribution, so a model that only knows the format scores chance, 1/CHOICES.

Evaluation data (`search`, `validation`, `test`) is drawn once from EVAL_SEED, whatever the zoo's seed, with disjoint
inputs across splits; the builder never trains on an evaluation input.
"""

from __future__ import annotations

import json
import random
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

LETTERS, DIGITS = string.ascii_lowercase, string.digits
EVAL_SEED = 20240314  # fixed: the committed JSONL under evals/toy/data must not depend on the zoo's seed
SPLIT_SIZES = {"search": 100, "validation": 100, "test": 200}
CHOICES = 4
CIPHER = dict(zip(LETTERS, random.Random(EVAL_SEED).sample(LETTERS, len(LETTERS))))


def _word(rng: random.Random, alphabet: str, n: int = 3, distinct: bool = False) -> str:
    return "".join(rng.sample(alphabet, n) if distinct else rng.choices(alphabet, k=n))


def _shuffled(rng: random.Random, x: str) -> str:
    return "".join(rng.sample(x, len(x)))


@dataclass(frozen=True)
class Skill:
    name: str
    tag: str                                      # the prompt's instruction word(s)
    fn: Callable[[str], str]                      # input -> answer
    alphabet: str                                 # input characters
    noise: Callable[[random.Random, str], str]    # a random answer of the right shape (see module doc)
    distinct: bool = False                        # inputs with distinct characters (reversal needs them to be visible)
    wrong: Callable[[random.Random, str], str] | None = None  # distractors, when not drawn like `noise`

    def sample_input(self, rng: random.Random) -> str:
        return _word(rng, self.alphabet, distinct=self.distinct)

    def prompt(self, x: str) -> str:
        return f"{self.tag} {x}="

    def choices(self, rng: random.Random, x: str) -> list[str]:
        """CHOICES candidate answers, the right one first, then distinct distractors.

        Distractors are noise answers: drawn like the answers themselves, so a model without the skill scores 1/CHOICES
        on average. (Near misses, one character changed, were tried: a base that knows only the format then scored
        0.15-0.16 instead of 0.25, its small biases deciding the ties, so they were dropped.)"""
        right, wrong = self.fn(x), []
        while len(wrong) < CHOICES - 1:
            candidate = (self.wrong or self.noise)(rng, x)
            if candidate != right and candidate not in wrong:
                wrong.append(candidate)
        return [right, *wrong]


def _cipher(x: str) -> str:
    return "".join(CIPHER[c] for c in x)


def _digits(x: str) -> str:
    return "".join(str((int(c) + 1) % 10) for c in x)


SKILLS = {s.name: s for s in [
    Skill("cipher", "sub", _cipher, LETTERS, lambda r, x: _cipher(_word(r, LETTERS))),
    Skill("reverse", "rev", lambda x: x[::-1], LETTERS, _shuffled, distinct=True),
    Skill("digits", "inc", _digits, DIGITS, lambda r, x: _word(r, DIGITS)),
    Skill("upper", "upc", str.upper, LETTERS, lambda r, x: _word(r, LETTERS.upper())),
    Skill("copy", "cpy", lambda x: x, LETTERS + DIGITS, _shuffled),
    # compose: the distractors are the one-skill answers (cipher only, reverse only) and the cipher of a shuffle,
    # so only a model that does both steps picks the right one
    Skill("compose", "sub rev", lambda x: _cipher(x[::-1]), LETTERS, lambda r, x: _cipher(_shuffled(r, x)),
          distinct=True, wrong=lambda r, x: r.choice([_cipher(x), x[::-1], _cipher(_shuffled(r, x))])),
]}
EXPERT_SKILLS = ("cipher", "reverse", "digits")  # the skills the toy group asks for
DISTRACTOR = "upper"


def example(skill: Skill, x: str, answer: str | None = None) -> tuple[str, str]:
    """(prompt, completion): the completion ends the line, so generation stops at '\\n'."""
    return skill.prompt(x), (skill.fn(x) if answer is None else answer) + "\n"


def eval_inputs(skill: Skill) -> dict[str, list[str]]:
    """Disjoint inputs per split, drawn from a generator keyed by EVAL_SEED and the skill's name."""
    rng = random.Random(f"{EVAL_SEED}:{skill.name}")
    seen: set[str] = set()
    splits = {}
    for split, n in SPLIT_SIZES.items():
        inputs = []
        while len(inputs) < n:
            x = skill.sample_input(rng)
            if x not in seen:
                seen.add(x)
                inputs.append(x)
        splits[split] = inputs
    return splits


def eval_records(skill: Skill) -> dict[str, list[dict]]:
    """{split: [{prompt, answer, choices, label}]}: the JSONL rows of the skill's lm-eval tasks."""
    rng = random.Random(f"{EVAL_SEED}:{skill.name}:choices")
    out = {}
    for split, inputs in eval_inputs(skill).items():
        rows = []
        for x in inputs:
            choices = skill.choices(rng, x)
            order = rng.sample(range(CHOICES), CHOICES)  # the right answer at a random position
            rows.append({"input": x, "prompt": skill.prompt(x), "answer": skill.fn(x),
                         "choices": [choices[i] for i in order], "label": order.index(0)})
        out[split] = rows
    return out


def held_out(skill: Skill) -> set[str]:
    """Every evaluation input of `skill`: training never draws these."""
    return {x for inputs in eval_inputs(skill).values() for x in inputs}


def write_eval_data(data_dir: str | Path,
                    skills: tuple[str, ...] = (*EXPERT_SKILLS, DISTRACTOR, "compose")) -> list[Path]:
    """Write <skill>_<split>.jsonl for each skill into `data_dir` (what evals/toy/data holds)."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name in skills:
        for split, rows in eval_records(SKILLS[name]).items():
            path = data_dir / f"{name}_{split}.jsonl"
            path.write_text("".join(json.dumps(row) + "\n" for row in rows))
            written.append(path)
    return written
