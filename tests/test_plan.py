"""`evomerge plan`: the search's checks without a run dir, and a memory plan from the models' headers; `search` refuses
`workers.sources: device` that its plan says does not fit.

The paper's setting (experiments/paper_mistral7b_ps.yaml) is planned over Mistral-7B-shaped model dirs that hold a
config.json and a safetensors header only: the header states each tensor's dtype and shape exactly as the real files
do, and the plan reads nothing else (the data, 14.5 GB a model, is not there and is never read).
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from evomerge.cli import main

sys.path.insert(0, str(Path(__file__).parent))
from test_checks import assert_refused, experiment, search  # noqa: E402

PAPER = Path(__file__).resolve().parents[1] / "experiments" / "paper_mistral7b_ps.yaml"
GB = 10**9


def header_only_model(path: Path, config) -> Path:
    """A model dir whose model.safetensors is the header of `config`'s weights in its dtype, without their data."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    header, offset = {}, 0
    for name, tensor in model.state_dict().items():
        size = tensor.numel() * 2  # bfloat16
        header[name] = {"dtype": "BF16", "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    path.mkdir(parents=True)
    config.save_pretrained(path)
    blob = json.dumps(header).encode()
    (path / "model.safetensors").write_bytes(struct.pack("<Q", len(blob)) + blob)
    return path


@pytest.fixture(scope="module")
def mistral_dirs(tmp_path_factory):
    from transformers import MistralConfig

    root = tmp_path_factory.mktemp("mistral7b")
    config = MistralConfig(dtype="bfloat16")  # the defaults are Mistral-7B-v0.1's shape
    return [str(header_only_model(root / name, config)) for name in ("base", "shisa", "wizardmath", "abel")]


def paper_experiment(tmp_path: Path, mistral_dirs: list[str], **workers) -> Path:
    """The paper config over the header-only dirs, scored on a toy task (lm-eval's MGSM needs network)."""
    doc = yaml.safe_load(PAPER.read_text())
    doc["space"] = {**doc["space"], "base_model": mistral_dirs[0], "models": mistral_dirs[1:]}
    doc["evaluation"] = {"tasks": ["toy_digits_gen"], "split": "search"}
    doc["workers"] = {**doc["workers"], **workers}
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def mistral_arithmetic() -> dict[str, int]:
    """The plan's figures for Mistral-7B (bfloat16, 2 bytes) by hand: base + 3 experts, TIES/DARE over all four."""
    hidden, intermediate, layers, kv, head_dim, vocab, e = 4096, 14336, 32, 8, 128, 32000, 2
    per_layer = 2 * hidden * hidden + 2 * hidden * kv * head_dim + 3 * hidden * intermediate + 2 * hidden
    model = (layers * per_layer + 2 * vocab * hidden + hidden) * e  # 7,241,732,096 params
    tokens = 64 * 1024
    reserve = tokens * 2 * layers * kv * head_dim * e + max(tokens * intermediate * 3 * e, tokens * vocab * 2 * e) \
        + tokens * hidden * 2 * e
    merge = 4 * vocab * hidden * e  # the largest task: the embeddings of four models
    return {"model": model, "reserve": reserve, "merge": merge,
            "device": 5 * model + reserve + merge, "host": model + reserve + 2 * merge}


def test_the_paper_plan_fits_host_in_40_gb_and_not_device_in_80(mistral_dirs, tmp_path):
    exp = paper_experiment(tmp_path, mistral_dirs)
    result = CliRunner().invoke(main, ["plan", str(exp), "--device-memory", "80GB"])
    assert result.exit_code == 0, result.output
    expected = mistral_arithmetic()
    assert expected["model"] == 7_241_732_096 * 2
    assert expected["host"] < 40 * GB < 80 * 2**30 < expected["device"]

    from evomerge.run.config import load_experiment
    from evomerge.run.loop import memory_plan

    planned = paper_experiment(tmp_path, mistral_dirs, device_memory="80GB")  # the CLI option, as a key
    plan, capacity = memory_plan(load_experiment(planned), source=str(planned), device_here=False)
    assert capacity == 80 * 2**30
    assert (plan.live, plan.reserve.total, plan.merge) == (expected["model"], expected["reserve"], expected["merge"])
    assert plan.device_total("device") == expected["device"] and plan.device_total("host") == expected["host"]
    assert plan.device_total("disk") == expected["host"]
    assert plan.host("disk", 8) == plan.host("host", 8) == 4 * expected["model"]  # one copy per node, 8 workers
    assert plan.host("device", 8) == 0
    assert plan.moved("host") == plan.moved("disk") == 4 * expected["model"]  # every input once, per candidate

    rows = {line.split(" | ")[0].strip("| "): line for line in result.output.splitlines() if line.startswith("| ")}
    assert " | 85.2 GiB | no | " in rows["device"] and " | 32.3 GiB | yes | " in rows["host"], result.output
    assert "workers.sources: auto -> host here" in result.output
    comment = PAPER.read_text().split("\nname:")[0]
    assert "85.2 GiB" in comment and "32.3 GiB" in comment and "16.8 GiB" in comment  # the config says what plan says


def test_plan_reads_hub_models_headers_without_downloading_their_weights(mistral_dirs, tmp_path, monkeypatch):
    """The paper config names hub repos: `plan` reads each one's config.json and safetensors headers (huggingface_hub's
    get_safetensors_metadata: ranged reads) and plans exactly as over the same models on disk; nothing is downloaded
    whole. The hub here is a stand-in serving the header-only dirs."""
    import huggingface_hub
    from huggingface_hub.utils import SafetensorsFileMetadata, SafetensorsRepoMetadata, TensorInfo

    doc = yaml.safe_load(PAPER.read_text())
    repos = dict(zip([doc["space"]["base_model"], *doc["space"]["models"]], map(Path, mistral_dirs)))
    doc["space"]["base_model"] += "@26bca36"  # pinned to a revision: what is read is that revision's
    revisions = []

    def config_file(repo_id, filename, revision=None, **_):
        assert filename == "config.json", filename
        revisions.append((repo_id, revision))
        return str(repos[repo_id] / filename)

    def metadata(repo_id, revision=None, **_):
        revisions.append((repo_id, revision))
        blob = (repos[repo_id] / "model.safetensors").read_bytes()
        header = json.loads(blob[8:8 + struct.unpack("<Q", blob[:8])[0]])
        tensors = {name: TensorInfo(dtype=e["dtype"], shape=e["shape"], data_offsets=tuple(e["data_offsets"]))
                   for name, e in header.items()}
        return SafetensorsRepoMetadata(metadata=None, sharded=False, weight_map=dict.fromkeys(tensors, "model.safetensors"),
                                       files_metadata={"model.safetensors": SafetensorsFileMetadata(None, tensors)})

    def no_download(*args, **kwargs):
        raise AssertionError(f"downloaded {args or kwargs}")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", config_file)
    monkeypatch.setattr(huggingface_hub, "get_safetensors_metadata", metadata)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_download)
    doc["evaluation"] = {"tasks": ["toy_digits_gen"], "split": "search"}
    (tmp_path / "hub.yaml").write_text(yaml.safe_dump(doc))
    on_hub = CliRunner().invoke(main, ["plan", str(tmp_path / "hub.yaml"), "--device-memory", "80GB"])
    assert on_hub.exit_code == 0, on_hub.output
    assert {r for _, r in revisions} == {None, "26bca36"}
    assert {r for repo, r in revisions if doc["space"]["base_model"].startswith(repo)} == {"26bca36"}
    on_disk = CliRunner().invoke(main, ["plan", str(paper_experiment(tmp_path, mistral_dirs)), "--device-memory", "80GB"])
    table = lambda output: [line for line in output.splitlines() if line.startswith("| ")]  # noqa: E731
    assert table(on_hub.output) == table(on_disk.output) and " | 32.3 GiB | yes | " in on_hub.output

    def unreachable(repo_id, **_):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(huggingface_hub, "get_safetensors_metadata", unreachable)
    result = CliRunner().invoke(main, ["plan", str(tmp_path / "hub.yaml")])
    assert result.exit_code == 2 and len(result.output.splitlines()) == 1, result.output
    assert result.output.startswith(f"error: {tmp_path / 'hub.yaml'}: space.base_model: mistralai/Mistral-7B-v0.1@26bca36: "
                                    "no such directory, and fetching it from the Hugging Face Hub failed (OSError: "
                                    "We couldn't connect"), result.output


def test_the_reserve_is_for_the_configured_evaluation_batch(mistral_dirs, tmp_path):
    from evomerge.run.config import load_experiment
    from evomerge.run.loop import memory_plan

    exp = paper_experiment(tmp_path, mistral_dirs, device_memory="80GB")
    doc = yaml.safe_load(exp.read_text())
    for batch, share in [(16, 4), ("16", 4), ("auto", 1)]:  # linear in the tokens; "16" as the CLI reads it; auto: 64
        doc["evaluation"]["batch_size"] = batch
        exp.write_text(yaml.safe_dump(doc))
        plan, _ = memory_plan(load_experiment(exp), source=str(exp), device_here=False)
        assert plan.reserve.total * share == mistral_arithmetic()["reserve"], batch


def test_a_state_space_models_reserve_holds_its_state_not_a_kv_cache(tmp_path):
    """Mamba has no attention: its evaluation keeps, per layer and sequence, a convolution and an SSM state of fixed
    size (intermediate_size x (conv_kernel + state_size)), not keys and values that grow with the tokens."""
    from evomerge.models.io import ModelDir
    from evomerge.run.memory import evaluation_reserve
    from tiny_models import build_tiny

    config = json.loads((build_tiny("mamba", tmp_path / "mamba", num_layers=3, hidden=32) / "config.json").read_text())
    reserve = evaluation_reserve(ModelDir.open(tmp_path / "mamba"), torch.float32, batch=4)
    assert reserve.kv_cache == 4 * 3 * config["intermediate_size"] * (config["conv_kernel"] + config["state_size"]) * 4


def test_plan_refuses_device_that_does_not_fit_after_printing_the_plan(mistral_dirs, tmp_path):
    exp = paper_experiment(tmp_path, mistral_dirs, sources="device")
    result = CliRunner().invoke(main, ["plan", str(exp), "--device-memory", "80GB"])
    assert result.exit_code == 2
    last = result.output.strip().splitlines()[-1]
    assert last.startswith(f"error: {exp}: workers.sources: device needs 85.2 GiB (sources 54.0 GiB + live model "
                           "13.5 GiB + evaluation reserve 16.8 GiB + merge 1.0 GiB) per worker, more than the "
                           "80.0 GiB of its cuda device; use host or disk (32.3 GiB per worker)"), last


def test_plan_checks_what_search_checks_and_makes_no_run_dir(tiny_zoo, tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(experiment(tiny_zoo, workers={"backend": "ray", "num": 2})))
    result = CliRunner().invoke(main, ["plan", str(path)])
    assert result.exit_code == 0, result.output
    assert "| host | 0 B |" in result.output and "workers.sources: auto -> host here" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp.yaml"]

    path.write_text(yaml.safe_dump(experiment(tiny_zoo, space={"layer_groups": 3})))
    result = CliRunner().invoke(main, ["plan", str(path)])
    assert result.exit_code == 2 and "space.layer_groups: 3 groups for 2 layers" in result.output


def test_the_plan_sizes_the_live_model_a_search_loads(tmp_path):
    """A GLM-4.5 checkpoint's multi-token-prediction layer, which transformers does not load, is no part of the live
    model the plan sizes or of the sources it counts: its sizes are the loaded models' bytes."""
    from tiny_models import add_mtp_layer, build_tiny, make_variants

    from evomerge.models.io import load_live_model
    from evomerge.run.checks import check_space
    from evomerge.run.config import experiment_from_dict

    base = add_mtp_layer(build_tiny("glm4_moe", tmp_path / "base", num_layers=2, hidden=32))
    (a,) = make_variants(base, tmp_path, n=1)
    doc = {"name": "plan", "seed": 0, "optimizer": {"name": "random"}, "budget": {"trials": 2},
           "space": {"kind": "ps", "method": "linear", "models": [str(base), str(a)], "search": ["weight"],
                     "layer_groups": 1, "bounds": {"weight": [0.0, 1.0]}},
           "evaluation": {"tasks": ["toy_cipher_gen"], "limit": 2}, "workers": {"sources": "host"}}
    memory = check_space(experiment_from_dict(doc), "exp.yaml").memory
    live = load_live_model(base)
    loaded = sum(t.numel() * t.element_size() for t in live.state_dict().values())  # (not its rotary frequencies)
    assert memory.live == loaded and memory.all_sources == 2 * loaded


def test_search_stops_before_loading_a_model_when_device_does_not_fit(tiny_zoo, tmp_path):
    result = search(tmp_path, experiment(tiny_zoo, workers={"sources": "device", "device_memory": "1MB"}))
    assert_refused(result, tmp_path, "workers.sources", "device needs ")
    assert "more than the 1.0 MiB of its cpu device" in result.output


def test_sources_and_device_memory_take_known_values_only(tiny_zoo, tmp_path):
    assert_refused(search(tmp_path, experiment(tiny_zoo, workers={"sources": "gpu"})), tmp_path, "workers.sources",
                   "Input should be 'device', 'host', 'disk' or 'auto'")
    assert_refused(search(tmp_path, experiment(tiny_zoo, workers={"device_memory": "lots"})), tmp_path,
                   "workers.device_memory", "not a size: 'lots'")
