"""Recipe: YAML in/out (evomerge, mergekit, mergekit-multi), identity, mergekit parameter semantics."""

import random

import pytest
import yaml

from evomerge.errors import EvomergeError
from evomerge.recipe import (
    MERGED, Conditional, LayerSlot, Recipe, evaluate_setting, load_recipe, recipe_from_dict, save_recipe,
    to_evomerge_yaml, to_mergekit_yaml,
)

MERGEKIT_TIES = """
merge_method: ties
base_model: base
models:
  - model: a
    parameters:
      weight: [0.2, 0.9, 0.4]
      density:
        - filter: self_attn
          value: 0.3
        - value: [0.5, 0.7]
  - model: b
    parameters: {weight: 0.5, density: 0.5}
parameters: {normalize: true, int8_mask: true}
dtype: bfloat16
out_dtype: float32
tokenizer_source: base
chat_template: auto
"""


def parse(text, source="r.yaml"):
    return recipe_from_dict(list(yaml.safe_load_all(text)), source)


def test_mergekit_yaml_round_trip_keeps_identity():
    r = parse(MERGEKIT_TIES)
    assert r.merge.method == "ties" and r.merge.dtype == "bfloat16" and r.merge.tokenizer_source == "base"
    assert r.merge.chat_template == "auto"
    again = parse(to_mergekit_yaml(r))
    assert again == r and again.identity == r.identity
    assert parse(to_evomerge_yaml(r)) == r


def test_identity_ignores_provenance_and_chat_template_only():
    r = parse(MERGEKIT_TIES)
    assert r.with_provenance(trial=3, fitness=0.5).identity == r.identity
    template = r.model_copy(update={"merge": r.merge.model_copy(update={"chat_template": "{{ messages }}"})})
    assert template.identity == r.identity  # the same weights
    changed = r.model_copy(update={"merge": r.merge.model_copy(update={"seed": 1})})
    assert changed.identity != r.identity


def test_identity_is_what_earlier_versions_computed():
    """A run dedupes its candidates by recipe identity, also after a resume under a newer evomerge: these are the
    identities evomerge gave these recipes before it read mergekit's `modules:` (dacf034)."""
    r = parse(MERGEKIT_TIES)
    path = Recipe(merge=r.merge, layers=[LayerSlot(source=MERGED, layer=0), LayerSlot(source="a", layer=1, scale=0.5)])
    assert (r.identity, path.identity) == ("a7c3514e54ab490b", "dbc2a948ab233faa")


def test_gradients_and_filters_match_mergekit():
    from mergekit.config import ConditionalParameter, evaluate_setting as mk_evaluate

    rng = random.Random(0)
    for _ in range(200):
        values = [round(rng.uniform(-1, 2), 3) for _ in range(rng.randint(1, 5))]
        t = rng.choice([0.0, 1.0, rng.random()])
        assert evaluate_setting(values, "x", t) == pytest.approx(mk_evaluate("x", values, t, validate=float))
    ours = [Conditional(filter="mlp", value=[0.1, 0.9]), Conditional(value=0.5)]
    theirs = [ConditionalParameter(filter="mlp", value=[0.1, 0.9]), ConditionalParameter(value=0.5)]
    for name in ("model.layers.3.mlp.up_proj.weight", "model.layers.3.self_attn.q_proj.weight"):
        for t in (0.0, 0.25, 1.0):
            assert evaluate_setting(ours, name, t) == pytest.approx(mk_evaluate(name, theirs, t, validate=float))


def test_layer_path_export_and_mergekit_multi_import():
    ps = parse(MERGEKIT_TIES).merge
    r = Recipe(merge=ps, layers=[LayerSlot(source=MERGED, layer=0), LayerSlot(source=MERGED, layer=1),
                                 LayerSlot(source="a", layer=1, weight_scale=0.5)])
    docs = list(yaml.safe_load_all(to_mergekit_yaml(r)))
    assert len(docs) == 2 and docs[0]["name"] == "evomerge-ps" and docs[1]["merge_method"] == "passthrough"
    assert docs[1]["slices"][0]["sources"][0] == {"model": "evomerge-ps", "layer_range": [0, 2]}
    assert parse(to_mergekit_yaml(r)) == r


MERGEKIT_TOKENIZER = """
merge_method: linear
models:
  - {model: a, parameters: {weight: 1.0}}
  - {model: b, parameters: {weight: 1.0}}
tokenizer:
  pad_to_multiple_of: 64
  tokens:
    <|im_start|>: {source: b}
    <|im_end|>: {source: {kind: zero}, force: true}
    <tool>: {source: {kind: model_token, model: a, token: <|tool|>}}
    <pad>: {source: {kind: model_token, model: a, token_id: 0}}
"""


def test_mergekit_tokenizer_block_round_trips_and_mergekit_reads_the_export():
    from mergekit.config import MergeConfiguration

    r = parse(MERGEKIT_TOKENIZER)
    assert r.merge.tokenizer_source == "union" and r.merge.pad_to_multiple_of == 64  # mergekit's default source
    assert r.merge.tokens["<|im_end|>"].force and r.merge.tokens["<pad>"].source.token_id == 0
    exported = yaml.safe_load(to_mergekit_yaml(r))
    assert "tokenizer_source" not in exported and exported["tokenizer"]["source"] == "union"
    assert MergeConfiguration.model_validate(exported).tokenizer.tokens["<tool>"].source.token == "<|tool|>"
    assert parse(to_mergekit_yaml(r)) == r and parse(to_evomerge_yaml(r)) == r
    path = Recipe(merge=r.merge, layers=[LayerSlot(source=MERGED, layer=0)])  # mergekit-multi: both documents say it
    assert [d["tokenizer"] for d in yaml.safe_load_all(to_mergekit_yaml(path))] == [exported["tokenizer"]] * 2
    assert parse(to_mergekit_yaml(path)) == path


MERGEKIT_MODULES = """
merge_method: ties
base_model: base
modules:
  text_decoder:
    slices:
      - sources:
          - {model: a, layer_range: [0, 2], parameters: {weight: 0.7}}
          - {model: base, layer_range: [0, 2]}
      - sources:
          - {model: a, layer_range: [1, 3]}
          - {model: base, layer_range: [1, 3]}
    parameters: {weight: [0.2, 0.9]}
  vision_tower:
    models: [{model: a, parameters: {weight: 0.3}}]
  multi_modal_projector:
    models: [{model: base}]
parameters: {density: 0.5, weight: 1.0}
"""


def test_mergekit_modules_round_trip_and_mergekit_reads_the_export():
    """An image-text model's `modules:` (each module from models or slices of its own): read, written back as
    mergekit's YAML (which mergekit's own config model reads as the same modules), and as evomerge's."""
    from mergekit.config import MergeConfiguration

    r = parse(MERGEKIT_MODULES)
    assert list(r.merge.modules) == ["text_decoder", "vision_tower", "multi_modal_projector"]
    assert r.merge.referenced_models() == ["base", "a"] and r.source_layers() == [0, 1, 1, 2]
    assert r.merge.modules["text_decoder"].parameters["weight"] == [0.2, 0.9]
    exported = yaml.safe_load(to_mergekit_yaml(r))
    theirs = MergeConfiguration.model_validate(exported)
    assert theirs.modules["vision_tower"].models[0].parameters["weight"] == 0.3
    assert [s.sources[0].layer_range for s in theirs.modules["text_decoder"].slices] == [(0, 2), (1, 3)]
    assert parse(to_mergekit_yaml(r)) == r and parse(to_evomerge_yaml(r)) == r


def test_an_image_text_layer_path_exports_as_modules_and_reads_back():
    """mergekit reads slices of an image-text model only under `modules:`: a PS+DFS recipe's path document names the
    text model's slices and takes the other modules whole from the last slot's model, and reads back as the path."""
    stage = parse(MERGEKIT_TIES).merge
    r = Recipe(merge=stage, layers=[LayerSlot(source=MERGED, layer=0), LayerSlot(source="a", layer=1),
                                    LayerSlot(source="a", layer=2, weight_scale=0.5), LayerSlot(source=MERGED, layer=2)])
    docs = list(yaml.safe_load_all(to_mergekit_yaml(r, modules=("vision_tower", "multi_modal_projector"))))
    assert docs[1]["modules"]["vision_tower"] == {"models": [{"model": "evomerge-ps"}]}
    assert [s["sources"][0]["layer_range"] for s in docs[1]["modules"]["text_decoder"]["slices"]] == [[0, 1], [1, 2],
                                                                                                    [2, 3], [2, 3]]
    assert parse(yaml.safe_dump_all(docs)) == r
    docs[1]["modules"]["vision_tower"] = {"models": [{"model": "a"}]}  # not the last slot's: not a path
    with pytest.raises(EvomergeError, match="the second mergekit-multi document must be passthrough slices"):
        parse(yaml.safe_dump_all(docs))


@pytest.mark.parametrize("key, value", [("chat_template", "auto"), ("tokenizer_source", "a"), ("dtype", "float16")])
def test_a_mergekit_multi_path_document_cannot_set_what_the_first_one_does_not(key, value):
    """The second document's dtype, tokenizer or chat template would be dropped (the recipe keeps the first's)."""
    first = {"name": "ps", "merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 1.0}}]}
    second = {"merge_method": "passthrough", "slices": [{"sources": [{"model": "ps", "layer_range": [0, 2]}]}]}
    assert recipe_from_dict([first, second], "m.yaml").layers  # without the key: a recipe
    with pytest.raises(EvomergeError, match=f"{key}: {value!r} in the second document differs"):
        recipe_from_dict([first, {**second, key: value}], "m.yaml")
    assert recipe_from_dict([{**first, key: value}, {**second, key: value}], "m.yaml")  # the same in both: fine


def test_hidden_scale_must_be_folded_before_mergekit_export():
    r = Recipe(layers=[LayerSlot(source="a", layer=0, scale=0.5)])
    with pytest.raises(ValueError, match="fold"):
        to_mergekit_yaml(r)


def test_passthrough_gradient_scale_is_evaluated_per_layer():
    text = """
merge_method: passthrough
slices:
  - sources: [{model: a, layer_range: [0, 3], parameters: {scale: [0.0, 1.0]}}]
"""
    stage = parse(text).merge
    assert stage.method == "passthrough" and stage.slices[0].sources[0].layer_range == (0, 3)
    multi = f"name: first\n{MERGEKIT_TIES}\n---\n{text}".replace("model: a,", "model: first,")
    path = parse(multi).layers
    assert [s.source for s in path] == [MERGED] * 3
    assert [s.weight_scale for s in path] == [0.0, 0.5, 1.0]


@pytest.mark.parametrize("text, key", [
    ("merge: {method: ties, base_model: a, modles: []}", "merge.modles"),
    ("merge: {method: ties, base_model: a}", "give exactly one of 'models', 'slices' or 'modules'"),
    ("merge_method: ties\nmodels: [{model: a}]\nbogus: 1", "bogus"),
    ("layers: [{source: merged, layer: 0}]", "needs a 'merge' stage"),
    ("layers: [{source: a, layer: -1}]", "layers.0.layer"),
    ("[1, 2]", "expected a mapping"),
])
def test_bad_recipes_give_one_line_errors_naming_file_and_key(text, key):
    with pytest.raises(EvomergeError) as err:
        parse(text, source="bad.yaml")
    message = str(err.value)
    assert message.startswith("bad.yaml") and key in message and "\n" not in message


def test_load_and_save(tmp_path):
    r = parse(MERGEKIT_TIES)
    save_recipe(r, tmp_path / "r.yaml")
    save_recipe(r, tmp_path / "m.yaml", fmt="mergekit")
    assert load_recipe(tmp_path / "r.yaml") == r == load_recipe(tmp_path / "m.yaml")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.yaml", "r.yaml"]  # no temp files left
    with pytest.raises(EvomergeError, match="missing.yaml: cannot read"):
        load_recipe(tmp_path / "missing.yaml")
    (tmp_path / "broken.yaml").write_text("merge: [")
    with pytest.raises(EvomergeError, match="broken.yaml: invalid YAML"):
        load_recipe(tmp_path / "broken.yaml")
