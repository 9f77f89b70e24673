"""Finding and loading lm-eval tasks: evomerge's own `evals/` dir, user task dirs, and (when asked) lm-eval's built-ins.

Every failure a user can cause (unknown name, missing data file, unknown or empty split) becomes a one-line
EvomergeError that names the task and the file or split.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from functools import partial
from pathlib import Path
from typing import Sequence

from evomerge.errors import EvomergeError, did_you_mean

log = logging.getLogger(__name__)


def evals_dir() -> Path:
    """evomerge's task dir: $EVOMERGE_EVALS, else the wheel's evomerge/evals, else the checkout's evals/ (editable)."""
    if os.environ.get("EVOMERGE_EVALS"):
        return Path(os.environ["EVOMERGE_EVALS"])
    package = Path(__file__).resolve().parents[1]
    return package / "evals" if (package / "evals").is_dir() else package.parent / "evals"


def quiet_lm_eval() -> None:
    """lm-eval logs to the `lm_eval` logger; without a handler Python would print its warnings on the console.

    A NullHandler stops that, and records still propagate to whatever log file the application configured.
    """
    logger = logging.getLogger("lm_eval")
    if not any(isinstance(h, logging.NullHandler) for h in logger.handlers):
        logger.addHandler(logging.NullHandler())


def task_manager(task_dirs: Sequence[str | os.PathLike] = (), include_defaults: bool = False):
    from lm_eval.tasks import TaskManager

    quiet_lm_eval()
    paths = [evals_dir(), *map(Path, task_dirs)]
    for path in paths[1:]:
        if not path.is_dir():
            raise EvomergeError(f"task dir does not exist: {path}", key="task_dirs")
    return TaskManager(include_defaults=include_defaults, include_path=[str(p) for p in paths if p.is_dir()])


def load_tasks(names: Sequence[str], task_dirs: Sequence[str | os.PathLike] = (), *, network: bool = False) -> dict:
    """lm-eval's task dict {tasks, groups, group_map} for `names` (tasks, groups or tags).

    Names are looked up in evals/ and `task_dirs` first. Only with `network=True` does a name found nowhere else fall
    back to lm-eval's built-in tasks (their datasets come from the Hugging Face Hub, so this needs network access).
    """
    if not names:
        raise EvomergeError("no tasks given", key="tasks")
    manager = task_manager(task_dirs)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown and network:
        manager = task_manager(task_dirs, include_defaults=True)
        unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        for path, reason in _unreadable_yamls(task_dirs):  # lm-eval skips them without a word
            raise EvomergeError(f"unknown task {unknown[0]!r}, and lm-eval skipped this file, which is not valid YAML "
                                f"({reason})", source=str(path), key="tasks")
        hint = "" if network else " (lm-eval's built-in tasks need network=True / --network)"
        raise EvomergeError(f"unknown task {unknown[0]!r}{hint}; {did_you_mean(unknown[0], manager.all_tasks)}",
                            key="tasks")
    try:
        with contextlib.redirect_stderr(io.StringIO()) as noise:  # datasets' progress bars, on a first load of its files
            loaded = manager.load(list(names))
        log.debug("loading tasks: %s", noise.getvalue()[-2000:])
        return loaded
    except FileNotFoundError as err:
        missing = err.filename or str(err)
        raise EvomergeError(f"data file missing: {missing} (relative data_files are read from the working directory)",
                            source=_failing_task_file(manager, names), key="tasks") from None
    except Exception as err:  # a malformed YAML, a dataset that cannot be fetched: name the task, keep one line
        raise EvomergeError(f"cannot load task(s) {', '.join(names)}: {type(err).__name__}: {_first_line(err)}",
                            source=_task_file(manager, names), key="tasks") from None


def cut_split(task, *, search: float, validation: float, seed: int = 0, split: str | None = None) -> None:
    """Cut one split of `task` (`split`, default its test split) three ways, in place: its documents shuffled by `seed`
    (numpy's PCG64), the first `search` become the `search` split, the next `validation` the `validation` split and
    the rest `test`, each in the shuffled order, so that its first documents (`limit`, racing's first stage) are a
    random sample even of a file sorted by topic. `search` and `validation` are counts, or shares of the split (floats
    below 1). The same cut on every machine and in every worker; the task's other splits stay (a training split its
    few-shot examples come from)."""
    import datasets
    import numpy as np

    name, split = task.config.task, split or task.config.test_split or task.config.validation_split
    available = list(task.dataset.keys()) if hasattr(task.dataset, "keys") else []
    if split not in available:
        raise EvomergeError(f"task {name} has no split {split!r} to cut (available: {', '.join(available) or 'none'})",
                            key="cut")
    rows = task.dataset[split]
    search, validation = (round(n * len(rows)) if isinstance(n, float) else n for n in (search, validation))  # shares
    if min(search, validation) < 1 or search + validation >= len(rows):
        raise EvomergeError(f"task {name}: its {split!r} split has {len(rows)} documents, too few for {search} search + "
                            f"{validation} validation + a test split", key="cut")
    order = np.random.default_rng(seed).permutation(len(rows))
    parts = {"search": order[:search], "validation": order[search:search + validation], "test": order[search + validation:]}
    kept = {other: docs for other, docs in task.dataset.items() if other != split}
    task.dataset = datasets.DatasetDict({**kept, **{part: rows.select(i.tolist()) for part, i in parts.items()}})


def select_split(task, split: str | None) -> int:
    """Point `task` at `split` (None: the task's own test split), read its documents into memory once, and return how
    many there are."""
    name = task.config.task
    if split is not None:
        available = list(task.dataset.keys()) if hasattr(task.dataset, "keys") else []
        if split not in available:
            hint = "; evaluation.cut (eval --cut) cuts one into search, validation and test" \
                if split in ("search", "validation", "test") else ""
            raise EvomergeError(f"task {name} has no split {split!r} (available: {', '.join(available) or 'none'})"
                                + hint, key="split")
        task.config.test_split = split
    docs = list(task.eval_docs)
    if not docs:
        raise EvomergeError(f"task {name}: split {task.config.test_split or task.config.validation_split!r} is empty",
                            key="split")
    # lm-eval's own doc_iterator reads and decodes the whole split again on every call that names documents by
    # index (`samples`), twice per task: ~30 ms a call on the toy's tasks, more than scoring a racing stage
    task.doc_iterator = partial(_doc_iterator, docs)
    return len(docs)


def _doc_iterator(docs: list, *, rank: int = 0, limit: int | None = None, world_size: int = 1,
                  samples: list[int] | None = None):
    """lm-eval's Task.doc_iterator over `docs` in memory: (index, document) pairs of the first `limit` documents, or
    of the documents at `samples` (indexed from 0 in that order, as lm-eval maps them back), this rank's share."""
    from lm_eval.utils import create_iterator

    chosen = [docs[i] for i in samples] if samples else docs
    return create_iterator(enumerate(chosen), rank=int(rank), limit=None if samples or not limit else int(limit),
                           world_size=int(world_size))


def _failing_task_file(manager, names: Sequence[str]) -> str | None:
    """The YAML of the first leaf task under `names` whose data cannot be found (a group's file names none)."""
    for leaf in _leaves(manager, names):
        try:
            manager.load([leaf])
        except FileNotFoundError:
            return _task_file(manager, [leaf])
        except Exception:  # noqa: BLE001 - another task's problem; keep looking for the missing file
            continue
    return _task_file(manager, names)


def _leaves(manager, names: Sequence[str]) -> list[str]:
    """The task names under `names`, groups expanded through their YAML's `task:` list."""
    out = []
    for name in names:
        cfg = getattr(manager.task_index.get(name), "cfg", None) or {}
        members = cfg.get("task") if "group" in cfg else None
        if isinstance(members, list):
            out += _leaves(manager, [m for m in members if isinstance(m, str)])
        else:
            out.append(name)
    return out


def _task_file(manager, names: Sequence[str]) -> str | None:
    for name in names:
        entry = manager.task_index.get(name)
        if entry is not None and getattr(entry, "yaml_path", None):
            return str(entry.yaml_path)
    return None


def _unreadable_yamls(task_dirs: Sequence[str | os.PathLike]):
    """(path, what is wrong and on which line) of each YAML under `task_dirs` that does not parse (lm-eval's
    `!function` tags and `include:` are not followed: only the syntax is checked)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    for path in sorted(p for d in task_dirs for p in Path(d).glob("**/*.yaml")):
        try:
            yaml.load(path.read_text(), Loader=Loader)
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
            mark = getattr(err, "problem_mark", None)
            yield path, (getattr(err, "problem", None) or _first_line(err)) + (f", line {mark.line + 1}" if mark else "")


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else ""
