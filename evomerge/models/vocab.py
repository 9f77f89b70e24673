"""Embeddings by token, not by row: a recipe's `tokenizer_source` makes the merge's vocabulary that tokenizer's, as in
mergekit.

Each source's embedding rows (and lm_head rows) are reordered to the chosen tokenizer's ids by token string, so the
merged model has one row per token of the tokenizer it ships. A token some sources lack gets, in those sources,
mergekit's stand-in row: the row of the one source that has it, else the base model's, else the mean of the sources
that have it (zero where none does). Without `tokenizer_source` the rows stay as they are and differing vocabularies are
cut to their common block of rows (merge.materialize).
"""

from __future__ import annotations

import torch

from evomerge.errors import EvomergeError
from evomerge.models.io import ModelDir
from evomerge.models.sources import Sources
from evomerge.recipe import MergeStage


def token_ids(model_dir: ModelDir, source: str) -> dict[str, int]:
    """token -> id of the model's tokenizer, as transformers loads it."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir.path)).get_vocab()
    except Exception as err:  # transformers raises OSError, ValueError, KeyError, ... for missing or bad files
        reason = (str(err).strip().splitlines() or [""])[0][:300]
        raise EvomergeError(f"{model_dir.path}: tokenizer_source needs every model's tokenizer; transformers cannot "
                            f"load this one ({type(err).__name__}: {reason})", source=source,
                            key="tokenizer_source") from None


class TokenAlignedSources:
    """`inner`, with each vocabulary tensor's rows reordered to the target tokenizer's ids (module doc). The aligned
    tensors of one name are made together, on the first `get` of that name, and kept until another name is asked."""

    def __init__(self, inner: Sources, target: ModelDir, base: str | None, source: str):
        self.inner, self.dirs, self.base = inner, inner.dirs, base
        vocab = token_ids(target, source)
        ids = {m: token_ids(d, source) for m, d in self.dirs.items()}
        self.size = max(vocab.values()) + 1
        # rows[m][i]: the row of target token i in model m (-1: m has no such token)
        self.rows = {m: torch.full((self.size,), -1, dtype=torch.long) for m in self.dirs}
        for m, own in ids.items():
            for token, i in vocab.items():
                self.rows[m][i] = own.get(token, -1)
        self.aligned: dict[str, dict[str, torch.Tensor]] = {}

    def get(self, model: str, name: str) -> torch.Tensor:
        if not self.dirs[model].arch.is_vocab_tensor(name):
            return self.inner.get(model, name)
        if name not in self.aligned:
            self.aligned = {name: self._align(name)}
        return self.aligned[name][model]

    def _align(self, name: str) -> dict[str, torch.Tensor]:
        tensors = {m: self.inner.get(m, name) for m, d in self.dirs.items() if name in d}
        rows = {m: self.rows[m].to(t.device) for m, t in tensors.items()}
        present = {m: (rows[m] >= 0) & (rows[m] < t.shape[0]) for m, t in tensors.items()}
        own = {m: t[rows[m].clamp(0, t.shape[0] - 1)] * present[m][:, None] for m, t in tensors.items()}
        count = sum(p.to(torch.int64) for p in present.values())
        stand_in = sum(own.values()) / count.clamp(min=1)[:, None].to(next(iter(own.values())).dtype)
        if self.base in tensors:
            stand_in = torch.where(present[self.base][:, None], own[self.base], stand_in)
        return {m: torch.where(present[m][:, None], own[m], stand_in) for m in tensors}


def by_token(sources: Sources, stage: MergeStage | None, tokenizer_from: str | None, source: str) -> Sources:
    """`sources` as they are, or aligned to the tokenizer the merge ships when its stage names a `tokenizer_source`."""
    if stage is None or not stage.tokenizer_source:
        return sources
    return TokenAlignedSources(sources, sources.dirs[tokenizer_from], stage.base_model, source)
