"""The toy zoo: skills and their data, tokenizer, training-data hygiene, the tiny build (loadable, deterministic)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from evomerge.errors import EvomergeError
from evomerge.zoo import skills
from evomerge.zoo.build import SEED, SIZES, build_zoo, delta_ratio, expert_mixture
from evomerge.zoo.skills import CHOICES, SKILLS, SPLIT_SIZES, eval_inputs, eval_records, held_out, write_eval_data
from evomerge.zoo.tokenizer import BOS, EOS, encode
from evomerge.zoo.train import Sampler

EVALS_DATA = Path(__file__).resolve().parents[1] / "evals" / "toy" / "data"
MODELS = ["base", "expert_cipher", "expert_reverse", "expert_digits", "expert_upper", "multitask"]


def test_skill_answers():
    assert SKILLS["reverse"].fn("abc") == "cba"
    assert SKILLS["digits"].fn("479") == "580"
    assert SKILLS["upper"].fn("abc") == "ABC"
    assert sorted(skills.CIPHER.values()) == list(skills.LETTERS)  # a permutation of the letters
    assert SKILLS["compose"].fn("abc") == SKILLS["cipher"].fn("cba")
    assert SKILLS["reverse"].prompt("abc") == "rev abc=" and SKILLS["compose"].prompt("abc") == "sub rev abc="


@pytest.mark.parametrize("name", ["cipher", "reverse", "digits", "upper", "compose"])
def test_eval_splits_are_deterministic_disjoint_and_well_formed(name):
    splits = eval_inputs(SKILLS[name])
    assert splits == eval_inputs(SKILLS[name])
    assert {k: len(v) for k, v in splits.items()} == SPLIT_SIZES
    assert len(set().union(*map(set, splits.values()))) == sum(SPLIT_SIZES.values())
    for rows in eval_records(SKILLS[name]).values():
        for row in rows:
            assert len(row["choices"]) == len(set(row["choices"])) == CHOICES
            assert row["choices"][row["label"]] == row["answer"] == SKILLS[name].fn(row["input"])
    labels = [row["label"] for row in eval_records(SKILLS[name])["test"]]
    assert set(labels) == set(range(CHOICES))  # the right answer is not always in one place


def test_committed_eval_data_matches_the_generator(tmp_path):
    for path in write_eval_data(tmp_path):
        assert (EVALS_DATA / path.name).read_text() == path.read_text(), f"regenerate {EVALS_DATA / path.name}"


def test_training_never_sees_an_evaluation_input():
    mixture = expert_mixture("digits", replay=0.3)
    seen = {}
    for prompt, _ in Sampler(mixture, seed=3).texts(4000):
        tag, x = prompt[:-1].rsplit(" ", 1)
        seen.setdefault(tag, set()).add(x)
    assert not seen["inc"] & held_out(SKILLS["digits"])
    assert not seen["rev"] & held_out(SKILLS["reverse"])
    assert len(seen["inc"]) > 400  # and it does see most of the other inputs


def test_expert_mixture_weights():
    mix = expert_mixture("cipher", replay=0.25)
    assert mix[0] == ("cipher", "true", 0.75)
    assert math.isclose(sum(w for _, _, w in mix), 1.0)
    assert all(mode == "noise" for name, mode, _ in mix[1:] if name != "copy")
    assert "cipher" not in [name for name, _, _ in mix[1:]]


def test_sampler_is_deterministic():
    mix = expert_mixture("reverse", 0.3)
    assert Sampler(mix, seed=1).texts(50) == Sampler(mix, seed=1).texts(50)
    assert Sampler(mix, seed=1).texts(50) != Sampler(mix, seed=2).texts(50)


def test_delta_ratio_formula():
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[3.0, 4.0]]))
    base = {"weight": torch.tensor([[3.0, 0.0]])}
    assert delta_ratio(model, base) == pytest.approx(4.0 / 3.0)


def test_tiny_zoo_dirs_load_with_their_tokenizer(tiny_zoo):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    manifest = json.loads((tiny_zoo / "zoo.json").read_text())
    assert sorted(manifest["models"]) == sorted(MODELS)
    assert manifest["skills"] == {"expert_cipher": "cipher", "expert_reverse": "reverse", "expert_digits": "digits"}
    assert manifest["distractor"] == "expert_upper"
    for name in MODELS:
        tok = AutoTokenizer.from_pretrained(tiny_zoo / name)
        assert tok("rev abc=")["input_ids"] == [BOS] + encode("rev abc=")
        assert tok.decode(tok("sub x=1\n")["input_ids"], skip_special_tokens=True) == "sub x=1\n"
        model = AutoModelForCausalLM.from_pretrained(tiny_zoo / name)
        assert model.config.model_type == "llama"
        # a complete Hugging Face config, as save_pretrained writes it (mergekit reads `architectures`)
        assert json.loads((tiny_zoo / name / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
        assert json.loads((tiny_zoo / name / "generation_config.json").read_text())["eos_token_id"] == EOS
        ratio = manifest["models"][name]["delta_ratio"]
        assert ratio is None if name == "base" else 0.005 < ratio < 0.3  # fine-tunes: a few % of the base's norm


def test_the_committed_zoo_has_complete_configs():
    zoo = Path(__file__).resolve().parents[1] / "zoo"
    for name in MODELS:
        assert json.loads((zoo / name / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"], name
        assert (zoo / name / "generation_config.json").is_file(), name


def test_zoo_build_defaults_to_the_committed_zoos_seed_and_numerics():
    from evomerge.cli import zoo_build

    manifest = json.loads((Path(__file__).resolve().parents[1] / "zoo" / "zoo.json").read_text())
    default = next(p.default for p in zoo_build.params if p.name == "seed")
    assert default == SEED == manifest["seed"] and manifest["size"] == "default" and manifest["numerics"] == "pinned"


def test_build_is_deterministic_by_seed(tmp_path):
    tiny = SIZES["tiny"]
    quick = replace(tiny, base=replace(tiny.base, steps=6), expert=replace(tiny.expert, steps=3),
                    multitask=replace(tiny.multitask, steps=3))
    for name, seed in [("a", 0), ("b", 0), ("c", 1)]:
        build_zoo(tmp_path / name, seed=seed, spec=quick, log=None)

    def weights(zoo, model):
        return load_file(tmp_path / zoo / model / "model.safetensors")

    for model in MODELS:
        a, b, c = weights("a", model), weights("b", model), weights("c", model)
        assert all(torch.equal(a[k], b[k]) for k in a), model
        assert not all(torch.equal(a[k], c[k]) for k in a), model


def test_unknown_size_and_foreign_directory(tmp_path):
    with pytest.raises(EvomergeError, match="unknown zoo size 'huge'.*available: default, tiny"):
        build_zoo(tmp_path / "z", size="huge")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(EvomergeError, match="not a zoo"):
        build_zoo(tmp_path / "other", size="tiny", log=None)




def test_zoo_build_pins_its_numerics_whatever_the_environment_says(tmp_path):
    """`evomerge zoo build` sets numerics.PINNED before torch starts, so the weights do not depend on which code path
    the CPU (or the caller's environment) would pick: a build told to use other paths gives the same bits."""
    repo = Path(__file__).resolve().parents[1]
    other_paths = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE", "ONEDNN_MAX_CPU_ISA": "SSE41"}
    builds = {}  # both at once: each trains on one thread
    for name, extra in [("plain", {}), ("told_otherwise", other_paths)]:
        env = {**os.environ, **extra, "PYTHONPATH": str(repo)}
        builds[name] = subprocess.Popen([sys.executable, "-m", "evomerge.cli", "zoo", "build", str(tmp_path / name),
                                         "--size", "tiny"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True)
    for name, build in builds.items():
        _, stderr = build.communicate(timeout=600)
        assert build.returncode == 0, stderr[-2000:]
        assert json.loads((tmp_path / name / "zoo.json").read_text())["numerics"] == "pinned"
    for model in MODELS:
        a = load_file(tmp_path / "plain" / model / "model.safetensors")
        b = load_file(tmp_path / "told_otherwise" / model / "model.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), model
