"""Search spaces: genome -> Recipe for PS, DFS and PS+DFS; the shipped space files; bad input."""

from pathlib import Path

import numpy as np
import pytest
import yaml

from evomerge.errors import EvomergeError
from evomerge.merge.plan import validate_stage
from evomerge.recipe import MERGED, evaluate_setting, recipe_from_dict, to_evomerge_yaml, to_mergekit_yaml
from evomerge.spaces import load_space_config, space_from_dict, space_from_yaml, space_models

SPACES = Path(__file__).resolve().parents[1] / "search_spaces"
LAYERS = {"base": 6, "a": 6, "b": 6, "c": 4}


def ps(**fields):
    doc = {"kind": "ps", "method": "ties", "base_model": "base", "models": ["a", "b"], "bounds": {"weight": [0.0, 1.0]}}
    return space_from_dict({**doc, **fields}, num_layers=LAYERS, source="s.yaml")


def dfs(**fields):
    return space_from_dict({"kind": "dfs", "models": ["a", "c"], "repeats": 2, **fields}, num_layers=LAYERS, source="s.yaml")


def check_valid(space, genome):
    """A decoded recipe is valid: its merge stage passes the registry checks and it round-trips through YAML."""
    recipe = space.decode(genome)
    if recipe.merge:
        validate_stage(recipe.merge, "decoded")
    again = recipe_from_dict([yaml.safe_load(to_evomerge_yaml(recipe))])
    assert again == recipe and again.identity == recipe.identity
    return recipe


# ---------------------------------------------------------------------------------------------------------------------
# the shipped files


@pytest.mark.parametrize("name", ["ties_per_model", "ties_per_layer", "dare_ties", "dfs", "psdfs"])
def test_shipped_spaces_decode_valid_recipes(name, tmp_path):
    ps_winner = tmp_path / "winner.yaml"
    ps_winner.write_text("merge_method: ties\nbase_model: base\nmodels: [{model: a, parameters: {weight: 1.0}}]\n")
    overrides = {"base_model": "base", "models": ["a", "b"]} if name in ("ties_per_model", "ties_per_layer", "dare_ties") \
        else {"models": ["a", "c"], "pin": "c"} if name == "dfs" else {"models": [MERGED, "c"], "merge": str(ps_winner)}
    config = load_space_config({"include": str(SPACES / f"{name}.yaml"), **overrides}, source="exp.yaml")
    space = space_from_dict({"include": str(SPACES / f"{name}.yaml"), **overrides}, num_layers=LAYERS)
    assert set(space_models(config)) <= set(LAYERS)
    assert space.bounds[0].shape == space.bounds[1].shape == space.x0.shape == (space.dim,)
    assert np.all((space.x0 >= 0) & (space.x0 <= 1))
    rng = np.random.default_rng(0)
    for genome in [space.x0, np.zeros(space.dim), np.ones(space.dim), *rng.random((20, space.dim))]:
        check_valid(space, genome)
    assert space.describe().startswith(("PS space", "DFS space"))


def test_placeholder_models_must_be_overridden():
    with pytest.raises(EvomergeError, match=r"ties_per_model.yaml: base_model: no layer count for model "
                                            r"'.*/search_spaces/<base>' \(a placeholder"):
        space_from_yaml(SPACES / "ties_per_model.yaml", num_layers=LAYERS)


# ---------------------------------------------------------------------------------------------------------------------
# parameter space


def test_ps_per_model_genes_decode_to_known_values():
    space = ps(bounds={"weight": [0.0, 2.0], "density": [0.2, 1.0]}, fixed={"lambda": 0.9})
    assert [g.name for g in space.genes] == ["weight[a]", "weight[b]", "density[a]", "density[b]"]
    recipe = space.decode([0.25, 0.5, 0.0, 0.75])
    a, b = recipe.merge.models
    assert (a.model, a.parameters) == ("a", {"weight": 0.5, "density": 0.2})
    assert (b.model, b.parameters) == ("b", {"weight": 1.0, "density": 0.8})  # 0.2 + 0.75 * 0.8
    assert recipe.merge.parameters == {"lambda": 0.9} and recipe.merge.base_model == "base"
    mergekit = yaml.safe_load(to_mergekit_yaml(recipe))
    assert mergekit["models"][1] == {"model": "b", "parameters": {"weight": 1.0, "density": 0.8}}


def test_ps_defaults_come_from_the_registry():
    space = ps()
    assert [p.name for p in space.searched] == ["weight", "density"]  # ties' per-model numeric parameters
    assert [(g.low, g.high) for g in space.genes[2:]] == [(0.0, 1.0)] * 2  # density: the method's range
    np.testing.assert_array_equal(space.x0, [0.5, 0.5, 1.0, 1.0])  # weight: mid-bounds; density: the default 1.0
    della = ps(method="della", bounds={"weight": [0.0, 1.0], "density": [0.3, 0.8], "epsilon": [0.0, 0.15]})
    assert [p.name for p in della.searched] == ["weight", "density", "epsilon"]
    slerp = ps(method="slerp", models=["a"], bounds={})  # no per-model parameter: the global numeric ones
    assert [g.name for g in slerp.genes] == ["t"] and slerp.decode([0.3]).merge.parameters == {"t": 0.3}
    linear = ps(method="linear", base_model=None)
    assert [m.parameters for m in linear.decode([0.1, 0.9]).merge.models] == [{"weight": 0.1}, {"weight": 0.9}]


def test_della_bounds_that_keep_every_candidate_valid():
    """Within density [0.3, 0.8] and epsilon up to 0.15 every corner of the box decodes to a valid DELLA recipe (the
    default epsilon 0.15 with density searched in [0.2, 0.8] too); density fixed at 1 keeps everything, any epsilon."""
    space = ps(method="della", bounds={"weight": [0.0, 1.0], "density": [0.3, 0.8], "epsilon": [0.0, 0.15]})
    for corner in np.array(np.meshgrid(*[[0.0, 1.0]] * 3)).reshape(3, -1).T:  # weight, density, epsilon: low or high
        for entry in check_valid(space, np.repeat(corner, 2)).merge.models:
            d, e = entry.parameters["density"], entry.parameters["epsilon"]
            assert 0 < d - e and d + e < 1, (d, e)
    ps(method="della", search=["weight", "density"], bounds={"weight": [0.0, 1.0], "density": [0.2, 0.8]})
    ps(method="della", search=["weight", "epsilon"], bounds={"weight": [0.0, 1.0]}, fixed={"density": 1.0})


def test_ps_layer_groups_give_exact_per_layer_values():
    space = ps(layer_groups=3, search=["weight"])  # 6 layers -> groups {0,1}, {2,3}, {4,5}
    assert space.dim == 2 * 3 and space.genes[1].name == "weight[a].g1"
    weight_a = space.decode([0.1, 0.2, 0.3, 0.4, 0.5, 0.6]).merge.models[0].parameters["weight"]
    assert weight_a == [0.1, 0.1, 0.2, 0.2, 0.3, 0.3]
    for layer in range(6):  # mergekit evaluates a gradient list at t = layer / (num_layers - 1)
        assert evaluate_setting(weight_a, "x", layer / 5) == pytest.approx(weight_a[layer], abs=1e-12)
    per_layer = ps(layer_groups="all", search=["weight"])
    assert per_layer.dim == 12 and per_layer.group_of_layer == [0, 1, 2, 3, 4, 5]
    assert ps(layer_groups=4).group_of_layer == [0, 0, 1, 2, 2, 3]


def test_ps_attn_mlp_split_emits_filters():
    space = ps(layer_groups=2, split="attn_mlp", search=["density"], bounds={}, fixed={"weight": 1.0})  # genes per model: g0.{self_attn,mlp,rest}, g1...
    assert [g.name for g in space.genes[:3]] == ["density[a].g0.self_attn", "density[a].g0.mlp", "density[a].g0.rest"]
    genome = np.arange(12) / 11
    density = space.decode(genome).merge.models[0].parameters["density"]
    g0, g1 = genome[:3], genome[3:6]
    cases = {"model.layers.4.self_attn.q_proj.weight": g1[0], "model.layers.0.mlp.up_proj.weight": g0[1],
             "model.layers.5.input_layernorm.weight": g1[2]}
    for name, want in cases.items():
        layer = int(name.split(".")[2])
        assert evaluate_setting(density, name, layer / 5) == pytest.approx(want, abs=1e-6)
    assert evaluate_setting(density, "model.embed_tokens.weight", 0.0) == pytest.approx(g0[2], abs=1e-6)  # t = 0


def test_ps_split_by_filters_gives_each_filter_its_genes():
    """`split: [q_proj, k_proj, mlp]`: a gene per filter and one for the rest, each tensor read by the first filter its
    name contains (mergekit), in every layer group."""
    space = ps(layer_groups=2, split=["q_proj", "k_proj", "mlp"], search=["weight"])
    assert [g.name for g in space.genes[:4]] == ["weight[a].g0.q_proj", "weight[a].g0.k_proj", "weight[a].g0.mlp",
                                                 "weight[a].g0.rest"] and space.dim == 2 * 2 * 4
    genome = np.arange(16) / 15
    weight = space.decode(genome).merge.models[0].parameters["weight"]
    g0, g1 = genome[:4], genome[4:8]
    cases = {"model.layers.0.self_attn.q_proj.weight": g0[0], "model.layers.4.self_attn.k_proj.weight": g1[1],
             "model.layers.5.mlp.down_proj.weight": g1[2], "model.layers.1.self_attn.v_proj.weight": g0[3],
             "model.layers.3.post_attention_layernorm.weight": g1[3]}
    for name, want in cases.items():
        assert evaluate_setting(weight, name, int(name.split(".")[2]) / 5) == pytest.approx(want, abs=1e-6), name
    assert space.anchors[1][:8].tolist() == [1.0] * 8  # model a alone: weight 1 in every part and group
    assert ps(split="attn_mlp").config.filters == ("self_attn", "mlp")


@pytest.mark.parametrize("split", [[], ["mlp", "mlp"], ["mlp", ""], ["mlp", "rest"]])
def test_ps_split_filters_that_cannot_work(split):
    with pytest.raises(EvomergeError, match=r"s\.yaml: split: .*a list of distinct, non-empty tensor-name filters"):
        ps(split=split)


def test_ps_smooth_groups_are_the_points_of_a_gradient():
    """`smooth: true` (mergekit-evolve's): k group values spread evenly over the layers and interpolated between, so
    layer i of L reads np.interp(i / (L - 1), [0, 1 / (k - 1), ..., 1], values)."""
    space = ps(layer_groups=3, search=["weight"], smooth=True)
    values = [0.1, 0.7, 0.4]
    weight = space.decode(values + [0.5, 0.5, 0.5]).merge.models[0].parameters["weight"]
    assert weight == values
    for layer in range(6):
        want = np.interp(layer / 5, [0.0, 0.5, 1.0], values)
        assert evaluate_setting(weight, f"model.layers.{layer}.mlp.up_proj.weight", layer / 5) == pytest.approx(want)
    steps = ps(layer_groups=3, search=["weight"]).decode(values + [0.5, 0.5, 0.5]).merge.models[0].parameters["weight"]
    assert steps == [0.1, 0.1, 0.7, 0.7, 0.4, 0.4]  # without smooth: each group's value on its own layers


def layer_tensors(n: int = 6) -> dict[int, list[tuple[str, ...]]]:
    return {i: [(f"model.layers.{i}.self_attn.q_proj.weight",), (f"model.layers.{i}.mlp.up_proj.weight",),
                (f"model.layers.{i}.input_layernorm.weight",)] for i in range(n)}


def test_ps_started_at_a_recipe_decodes_to_it():
    """x0 moves to the recipe's values (mergekit's precedence: the model's own, else the stage's parameters)."""
    space = ps(layer_groups=2, bounds={"weight": [0.0, 1.0], "density": [0.1, 1.0]})
    stage = recipe_from_dict([{"merge_method": "ties", "base_model": "base", "parameters": {"density": 0.5},
                               "models": [{"model": "a", "parameters": {"weight": 0.3, "density": 0.6}},
                                          {"model": "b", "parameters": {"weight": 0.8}}]}]).merge
    assert space.started_at(stage, layer_tensors()) == []
    models = space.decode(space.x0).merge.models
    assert [m.parameters for m in models] == [{"weight": [0.3] * 6, "density": [0.6] * 6},
                                              {"weight": [0.8] * 6, "density": [0.5] * 6}]
    assert space.anchors[0].tolist() == space.x0.tolist()  # natural niches asks it first


def test_ps_started_at_a_gradient_and_filters_takes_each_gene_s_mean():
    """Genes per layer group and part: the mean of the recipe's values over the tensors each one sets (a gradient
    [0, 1] over 6 layers is i / 5 at layer i: groups {0, 1}, {2, 3}, {4, 5} average to 0.1, 0.5, 0.9); a value outside
    the bounds starts at the nearest bound, and is named."""
    space = ps(layer_groups=3, split=["self_attn", "mlp"], search=["weight"], bounds={"weight": [0.0, 0.6]})
    stage = recipe_from_dict([{"merge_method": "ties", "base_model": "base", "models": [
        {"model": "a", "parameters": {"weight": [{"filter": "self_attn", "value": [0.0, 1.0]}, {"value": 0.4}]}},
        {"model": "b", "parameters": {"weight": 0.2}}]}]).merge
    assert space.started_at(stage, layer_tensors()) == ["weight[a].g2.self_attn"]
    start = dict(zip((g.name for g in space.genes), space.raw(space.x0)))
    assert [start[f"weight[a].g{g}.self_attn"] for g in range(3)] == pytest.approx([0.1, 0.5, 0.6])  # 0.9 clipped
    assert [start[f"weight[a].g{g}.{part}"] for g in range(3) for part in ("mlp", "rest")] == pytest.approx([0.4] * 6)
    assert [v for k, v in start.items() if k.startswith("weight[b]")] == pytest.approx([0.2] * 9)


def test_ps_anchors_are_the_default_merge_and_each_model_alone():
    space = ps(layer_groups=2, bounds={"weight": [0.0, 1.5], "density": [0.1, 1.0]})
    first, *alone = space.anchors
    np.testing.assert_array_equal(first, space.x0)
    assert len(alone) == 2
    for k, genome in enumerate(alone):
        models = space.decode(genome).merge.models
        assert [m.parameters for m in models] == [{"weight": [float(i == k)] * 6, "density": [1.0] * 6} for i in range(2)]
    assert len(ps(bounds={"weight": [0.2, 1.0]}).anchors) == 1  # weight 0 not reachable: x0 only
    assert len(ps(bounds={"weight": [0.0, 1.0], "density": [0.1, 0.9]}).anchors) == 1  # density 1 not reachable
    assert len(ps(method="slerp", models=["a"], bounds={}).anchors) == 1  # no weight


def test_decode_is_pure_and_checks_the_genome():
    space = ps()
    genome = np.random.default_rng(1).random(space.dim)
    assert space.decode(genome) == space.decode(genome.copy())
    assert space.decode(genome).identity == space.decode(list(genome)).identity
    for bad in [genome[:-1], np.full(space.dim, np.nan), np.full(space.dim, 1.5)]:
        with pytest.raises(ValueError):
            space.decode(bad)
    assert space.named(np.ones(space.dim)) == {"weight[a]": 1.0, "weight[b]": 1.0, "density[a]": 1.0, "density[b]": 1.0}


@pytest.mark.parametrize("fields, message", [
    ({"bounds": {"weight": [1.0, 0.0]}}, "s.yaml: bounds.weight: low 1.0 must be below high 0.0"),
    ({"colour": 1}, "s.yaml: colour: unknown key"),
    ({"search": ["wieght"]}, "s.yaml: search: method ties has no parameter 'wieght'; did you mean 'weight'?"),
    ({"fixed": {"normalise": True}}, "s.yaml: fixed.normalise: .*did you mean 'normalize'"),
    ({"search": ["weight", "normalize"]}, "s.yaml: search: 'normalize' is true/false"),
    ({"method": "karcher", "base_model": None, "models": ["a", "b", "base"], "search": ["max_iter"], "bounds": {}},
     "s.yaml: search: 'max_iter' is a whole number and cannot be searched; set it under 'fixed'"),
    ({"method": "arcee_fusion", "models": ["a"], "bounds": {}}, "s.yaml: method: method arcee_fusion has no numeric "
                                                                "parameter to search"),
    ({"fixed": {"density": 0.5}, "search": ["weight", "density"]}, "fixed.density: 'density' is both searched and fixed"),
    ({"bounds": {}}, r"bounds.weight: method ties gives no range for 'weight'"),
    ({"bounds": {"weight": [0, 1], "density": [0.5, 1.5]}}, r"bounds.density: \[0.5, 1.5\] leaves the method's range"),
    ({"search": ["density"], "bounds": {}}, "search: method ties needs 'weight'"),
    ({"layer_groups": 7}, "layer_groups: 7 groups for 6 layers"),
    ({"models": ["a", "c"]}, "models: a PS merge needs models with one layer count"),
    ({"method": "tie"}, "s.yaml: method: unknown merge method 'tie'; did you mean 'ties'"),
    ({"method": "linear"}, "base_model: method linear takes no base_model"),
    ({"method": "slerp", "bounds": {}}, "method slerp takes exactly 1 model besides the base, got 2"),
    ({"models": ["a", "base"]}, "list only the models merged into base_model"),
    ({"kind": "pss"}, "s.yaml: kind: unknown space kind 'pss'; did you mean 'ps'"),
    ({"method": "della"}, r"s.yaml: bounds: della keeps entries with probability density \+- epsilon inside \(0, 1\): "
                          r"with density in \[0.0, 1.0\] epsilon must stay below 0, it reaches 0.5"),
    ({"method": "della_linear", "bounds": {"weight": [0, 1], "density": [0.2, 0.9]}, "fixed": {"epsilon": 0.1}},
     r"della_linear .* with density in \[0.2, 0.9\] epsilon must stay below 0.1, it reaches 0.1"),
])
def test_ps_bad_input_names_file_and_key(fields, message):
    with pytest.raises(EvomergeError, match=message):
        ps(**fields)


# ---------------------------------------------------------------------------------------------------------------------
# data-flow space


def test_dfs_layout_inclusion_and_matrix_scales():
    space = dfs(scale="matrix")  # a: 6 layers, c: 4 -> N = 10 distinct layers, T = 2 x 10 slots
    assert len(space.slots) == 20 and space.slots[:7] == [(0, 0, i) for i in range(6)] + [(0, 1, 0)]
    assert space.slots[10] == (1, 0, 0) and space.dim == 20 + 10 * 10
    assert space.genes[0].name == "include[r0.a.0]" and space.genes[20].name == "W[a.0->a.0]"
    raw = np.full(space.dim, -0.5)  # raw indicators in [-1, 1]; unit genome = (raw + 1) / 2
    on = [7, 2, 13]  # slot 7 = c.1 (rep 0), slot 2 = a.2 (rep 0), slot 13 = a.3 (rep 1): path order is slot order
    raw[on] = 0.25
    w = np.linspace(0.5, 1.5, 100).reshape(10, 10)  # W[i, j] scales the input of layer j after layer i
    raw[20:] = w.ravel()
    unit = np.concatenate([(raw[:20] + 1) / 2, (raw[20:] - 0.5) / 1.0])
    path = check_valid(space, unit).layers
    assert [(s.source, s.layer) for s in path] == [("a", 2), ("c", 1), ("a", 3)]
    ids = {("a", 2): 2, ("c", 1): 7, ("a", 3): 3}  # distinct-layer index: a's layers 0-5, then c's 6-9
    assert path[0].scale == 1.0  # the first layer reads the embeddings
    assert path[1].scale == pytest.approx(w[ids["a", 2], ids["c", 1]], abs=1e-6)
    assert path[2].scale == pytest.approx(w[ids["c", 1], ids["a", 3]], abs=1e-6)


def test_dfs_slot_and_no_scale():
    slot = dfs(scale="slot")
    assert slot.dim == 40 and slot.genes[20].name == "scale[r0.a.0]"
    unit = np.zeros(40)
    unit[[0, 15]] = 1.0  # include slot 0 (a.0, rep 0) and slot 15 (a.5, rep 1)
    unit[20 + 15] = 0.25  # the scale gene of slot 15
    path = slot.decode(unit).layers
    assert slot.slots[15] == (1, 0, 5)
    assert [(s.source, s.layer, s.scale) for s in path] == [("a", 0, 1.0), ("a", 5, 0.75)]
    none = dfs(scale="none")
    assert none.dim == 20 and all(s.scale == 1.0 for s in none.decode(np.ones(20)).layers)
    assert len(none.decode(np.ones(20)).layers) == 20


def test_dfs_start_pin_and_never_empty():
    space = dfs(scale="slot")
    assert [(s.source, s.layer) for s in space.decode(space.x0).layers] == [("a", i) for i in range(6)]  # model a as is
    empty = np.zeros(space.dim)
    empty[5] = 0.4  # all indicators below the threshold; slot 5 is the highest
    assert [(s.source, s.layer) for s in space.decode(empty).layers] == [("a", 5)]
    pinned = dfs(pin="c", scale="none")
    assert pinned.dim == 18 and pinned.pinned == {6, 19}  # c.0 in rep 0, c.3 in rep 1 have no gene
    assert [(s.source, s.layer) for s in pinned.decode(np.zeros(18)).layers] == [("c", 0), ("c", 3)]
    assert [(s.source, s.layer) for s in pinned.decode(pinned.x0).layers] == [("c", i) for i in range(4)]


def test_dfs_anchors_are_each_model_as_it_is():
    space = dfs(scale="slot", scale_bounds=[0.5, 2.0])
    paths = [[(s.source, s.layer, s.scale) for s in space.decode(g).layers] for g in space.anchors]
    assert paths == [[("a", i, 1.0) for i in range(6)], [("c", i, 1.0) for i in range(4)]]
    np.testing.assert_array_equal(space.anchors[0], space.x0)
    assert len(dfs(pin="c").anchors) == 1


def test_psdfs_uses_the_merge_stage(tmp_path):
    (tmp_path / "winner.yaml").write_text("merge_method: ties\nbase_model: base\nmodels: [{model: a, parameters: {weight: 1}}]\n")
    (tmp_path / "space.yaml").write_text("kind: dfs\nmodels: [merged, c]\nmerge: winner.yaml\nrepeats: 1\n")
    space = space_from_yaml(tmp_path / "space.yaml", num_layers={"base": 6, "a": 6, "c": 4})
    assert len(space.slots) == 10 and space.layer_counts == [6, 4]  # `merged` has the base's layers
    recipe = check_valid(space, space.x0)
    assert recipe.merge.method == "ties" and [(s.source, s.layer) for s in recipe.layers] == [(MERGED, i) for i in range(6)]
    assert space_models(load_space_config(tmp_path / "space.yaml")) == ["c", "base", "a"]
    inline = space_from_dict({"kind": "dfs", "models": [MERGED, "c"], "repeats": 1,
                              "merge": {"merge": {"method": "linear", "models": [{"model": "a", "parameters": {"weight": 1}},
                                                                                   {"model": "b", "parameters": {"weight": 1}}]}}},
                             num_layers=LAYERS)
    assert inline.decode(inline.x0).merge.method == "linear"


@pytest.mark.parametrize("fields, message", [
    ({"scale_bounds": [1.5, 0.5]}, "scale_bounds: need 1e-06 <= low < high"),
    ({"scale_bounds": [0.0, 1.0]}, "scale_bounds: need 1e-06 <= low < high"),
    ({"scale_bounds": [1e-7, 1.0]}, "scale_bounds: need 1e-06 <= low < high"),  # would round to a scale of 0
    ({"pin": "b"}, "pin: 'b' is not one of the models"),
    ({"models": [MERGED, "a"]}, "merge: give a merge recipe exactly when 'merged' is one of the models"),
    ({"models": ["a", "x"]}, "s.yaml: models: no layer count for model 'x'"),
    ({"repeats": 0}, "repeats: Input should be greater than or equal to 1"),
    ({"scale": "matrx"}, "scale: Input should be 'matrix', 'slot' or 'none'"),
])
def test_dfs_bad_input_names_file_and_key(fields, message):
    with pytest.raises(EvomergeError, match=message):
        dfs(**fields)


@pytest.mark.parametrize("fields, message", [
    ({"bounds": {"weight": [1.0, 0.0]}}, r"exp.yaml: space.bounds.weight: low 1.0 must be below high 0.0"),  # on load
    ({"colour": 1, "layer_groups": 0}, r"exp.yaml: space.layer_groups: must be at least 1.*; space.colour: unknown key"),
    ({"models": ["a", "a"]}, r"exp.yaml: space.models: a model is listed twice"),  # a model-level check
    ({"kind": "pss"}, r"exp.yaml: space.kind: unknown space kind 'pss'"),
    ({"search": ["wieght"]}, r"exp.yaml: space.search: method ties has no parameter 'wieght'"),  # on build
    ({"bounds": {"weight": [0, 1], "density": [0.5, 1.5]}}, r"exp.yaml: space.bounds.density: \[0.5, 1.5\] leaves"),
    ({"kind": "dfs", "models": ["a", "c"], "pin": "b"}, r"exp.yaml: space.pin: 'b' is not one of the models"),
    ({"kind": "dfs", "models": ["a", "x"]}, r"exp.yaml: space.models: no layer count for model 'x'"),
])
def test_errors_in_an_experiments_space_name_the_key_under_space(fields, message):
    ps_doc = {"kind": "ps", "method": "ties", "base_model": "base", "models": ["a", "b"], "bounds": {"weight": [0.0, 1.0]}}
    doc = fields if fields.get("kind") == "dfs" else {**ps_doc, **fields}
    with pytest.raises(EvomergeError, match=message):
        space_from_dict(doc, num_layers=LAYERS, source="exp.yaml", key="space")


def test_an_included_files_own_errors_keep_its_name(tmp_path):
    (tmp_path / "bad.yaml").write_text("kind: [ps\n")
    with pytest.raises(EvomergeError, match=r"^\S*bad.yaml: invalid YAML"):
        load_space_config({"include": "bad.yaml"}, source="exp.yaml", base_dir=tmp_path, key="space")


# ---------------------------------------------------------------------------------------------------------------------
# composition


def test_a_model_dir_named_base_is_a_path_and_tokenizer_source_base_a_word(tmp_path):
    """`base_model: base` next to the experiment names that dir (frozen absolute, so a resume finds it from anywhere);
    `tokenizer_source: base` stays the word mergekit reads as the base model."""
    for name in ("base", "a"):
        (tmp_path / name).mkdir()
    doc = {"kind": "ps", "method": "ties", "base_model": "base", "models": ["a"], "bounds": {"weight": [0, 1]}}
    assert load_space_config(doc, base_dir=tmp_path).base_model == str(tmp_path / "base")
    merge = {"method": "ties", "base_model": "base", "models": ["a"], "tokenizer_source": "base"}
    config = load_space_config({"kind": "dfs", "models": ["merged", "a"], "merge": merge}, base_dir=tmp_path)
    assert (config.merge["base_model"], config.merge["tokenizer_source"]) == (str(tmp_path / "base"), "base")


def test_include_replaces_top_level_keys_relative_to_the_including_file(tmp_path):
    (tmp_path / "spaces").mkdir()
    (tmp_path / "spaces" / "base.yaml").write_text("kind: ps\nmethod: ties\nbase_model: <base>\nmodels: [<x>]\n"
                                                   "bounds: {weight: [0, 1], density: [0.5, 1]}\n")
    (tmp_path / "exp.yaml").write_text("include: spaces/base.yaml\nbase_model: base\nmodels: [a, b]\n"
                                       "bounds: {weight: [0, 2]}\n")
    config = load_space_config(tmp_path / "exp.yaml")
    assert (config.base_model, config.models, config.bounds) == ("base", ["a", "b"], {"weight": (0.0, 2.0)})  # whole keys
    (tmp_path / "loop.yaml").write_text("include: loop.yaml\n")
    with pytest.raises(EvomergeError, match="include cycle"):
        load_space_config(tmp_path / "loop.yaml")
    with pytest.raises(EvomergeError, match="cannot read space file"):
        load_space_config({"include": "missing.yaml"}, base_dir=tmp_path)
