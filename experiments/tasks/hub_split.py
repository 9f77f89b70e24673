"""lm-eval `custom_dataset` loader: one split of a Hugging Face dataset cut three ways, so that a search scores on
`search`, picks its winner on `validation` and reports it on `test`, never on documents it has seen.

    custom_dataset: !function hub_split.load
    dataset_kwargs: {path: juletxara/mgsm, name: ja, split: test, search: 100, validation: 50, seed: 0}

The documents are shuffled by `seed` (numpy's PCG64), then the first `search` go to search, the next `validation` to
validation and the rest to test: the same cut on every machine. Needs network the first time (then the datasets cache).
"""


def load(path, name=None, split="test", search=100, validation=50, seed=0, **_):
    import datasets
    import numpy as np

    rows = datasets.load_dataset(path, name, split=split)
    if search + validation >= len(rows):
        raise ValueError(f"{path} {split} has {len(rows)} documents: too few for {search} search + {validation} "
                         "validation + a test split")
    order = np.random.default_rng(seed).permutation(len(rows))
    cuts = {"search": order[:search], "validation": order[search:search + validation], "test": order[search + validation:]}
    return datasets.DatasetDict({part: rows.select(sorted(indices.tolist())) for part, indices in cuts.items()})
