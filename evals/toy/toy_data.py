"""lm-eval `custom_dataset` loader for the toy tasks: reads data/<skill>_<split>.jsonl beside this file, offline.

(`dataset_path: json` with `data_files` would resolve paths against the working directory; this does not.)
Regenerate the files with
    python -c "from evomerge.zoo.skills import write_eval_data; write_eval_data('evals/toy/data')"
"""

import json
from pathlib import Path

SPLITS = ("search", "validation", "test")


def load(skill, **_):
    import datasets

    out = {}
    for split in SPLITS:
        path = Path(__file__).parent / "data" / f"{skill}_{split}.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        out[split] = datasets.Dataset.from_list(rows)
    return out
