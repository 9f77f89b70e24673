"""Embeddings by token, not by row: a recipe's `tokenizer_source` makes the merge's vocabulary that tokenizer's, as in
mergekit.

Each source's embedding rows (and lm_head rows) are reordered to the chosen tokenizer's ids by token string, so the
merged model has one row per token of the tokenizer it ships. A token some sources lack gets, in those sources,
mergekit's stand-in row: the row of the one source that has it, else the base model's, else the mean of the sources
that have it (zero where none does); or the row the recipe's `tokens` names for it (mergekit's `tokenizer.tokens`: a
model's row of that token or of another, or zeros; with `force` in every source). `pad_to_multiple_of` adds rows up
to a multiple, each the mean of the rows. Without `tokenizer_source` the rows stay as they are and differing
vocabularies are cut to their common block of rows (merge.materialize). `tokenizer_source: union` builds the
tokenizer: the base's, with every other model's tokens added (mergekit's union). `vocabulary` compares two models'
tokenizers from their files (a data-flow search warns when its models' differ).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass

import torch

from evomerge.errors import EvomergeError
from evomerge.models.io import VOCAB_FILES, ModelDir, ModelWriter, load_failure, recipe_model
from evomerge.models.sources import Sources
from evomerge.recipe import MergeStage, RowSource


def vocabulary(model_dir: ModelDir) -> object:
    """What a model's tokenizer maps to ids, from its files, for comparing two tokenizers: tokenizer.json's vocabulary
    and added tokens (its formatting and settings aside), else the other vocabulary files' bytes."""
    files = tuple((model_dir.path / f).read_bytes() if (model_dir.path / f).is_file() else None for f in VOCAB_FILES)
    try:
        fast = json.loads(files[0]) if files[0] else None
    except ValueError:  # unreadable: compared as bytes (loading the tokenizer names the fault)
        return files
    if not isinstance(fast, dict):
        return files
    model = fast.get("model")
    added = [(t.get("id"), t.get("content")) for t in fast.get("added_tokens") or [] if isinstance(t, dict)]
    return model.get("vocab") if isinstance(model, dict) else model, added, files[1:]


def load_tokenizer(model_dir: ModelDir, source: str):
    """The model's tokenizer as transformers loads it; else one line naming the model (and `source`)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir.path))
    except Exception as err:  # transformers raises OSError, ValueError, KeyError, ... for missing or bad files
        raise EvomergeError(f"{model_dir.path}: tokenizer_source needs every model's tokenizer; transformers cannot "
                            f"load this one ({load_failure(err)})", source=source, key="tokenizer_source") from None


def embedding_rows(model_dir: ModelDir) -> int | None:
    """The rows of a model's vocabulary tensors (the fewest, if its embeddings and head differ); None without any."""
    return min((model_dir.shape(n)[0] for n in model_dir.tensor_names if model_dir.arch.is_vocab_tensor(n)),
               default=None)


def union_tokenizer(base, others: list):
    """mergekit's `union`: the base's tokenizer, then every other token of the models' vocabularies (in model order,
    those past a model's embedding rows left out) added to it, their added tokens (special ones) last."""
    base_vocab, plain, added = base.get_vocab(), {}, {}
    for tokenizer, rows in [(base, None), *others]:
        for token, i in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]):  # by id: a fixed order
            if rows is None or i < rows:
                plain.setdefault(token, None)
        for i, info in tokenizer.added_tokens_decoder.items():
            if rows is None or i < rows:
                added.setdefault(info.content, info)
    union = copy.deepcopy(base)
    union.add_tokens([t for t in plain if t not in added and t not in base_vocab])
    union.add_tokens(list(added.values()))
    return union


@dataclass(frozen=True)
class TokenRow:
    """A recipe's `tokens` setting of one token (mergekit's): target id `token`'s stand-in row is row `row` of model
    `model` (zeros where model is None); with `force` every model takes it, not only those that lack the token."""

    token: int
    model: str | None
    row: int | None
    force: bool


def token_rows(stage: MergeStage, vocab: dict[str, int], ids: dict[str, dict[str, int]], dirs: dict[str, ModelDir],
               source: str) -> list[TokenRow]:
    """The stage's `tokens` settings over the target vocabulary `vocab` and each model's token -> id `ids`."""
    settings = []
    for token, setting in (stage.tokens or {}).items():
        key, origin = f"tokens.{token}.source", setting.source
        if token not in vocab:
            raise EvomergeError(f"{token!r} is not a token of the merged model's tokenizer", source=source,
                                key=f"tokens.{token}")
        if isinstance(origin, RowSource) and origin.kind == "zero":
            settings.append(TokenRow(vocab[token], None, None, setting.force))
            continue
        # a model's row: of this token (source: a model), or of the token or row id that a model_token names
        name, its_token, row = ((origin, token, None) if isinstance(origin, str)
                                else (origin.model, origin.token, origin.token_id))
        model = recipe_model(name, dirs, source, key)
        row = ids[model].get(its_token) if its_token is not None else row
        if row is None or row >= (embedding_rows(dirs[model]) or 0):
            raise EvomergeError(f"{model} has no {f'token {its_token!r}' if its_token is not None else f'row {row}'}",
                                source=source, key=key)
        settings.append(TokenRow(vocab[token], model, row, setting.force))
    return settings


class TokenAlignedSources:
    """`inner`, with each vocabulary tensor's rows reordered to the target tokenizer's ids (module doc). The aligned
    tensors of one name are made together, on the first `get` of that name, and kept until another name is asked."""

    def __init__(self, inner: Sources, target, ids: dict[str, dict[str, int]], base: str | None, *, built: bool = False,
                 settings: list[TokenRow] = (), pad_to_multiple_of: int | None = None, source: str = "<recipe>"):
        """`target`: the transformers tokenizer the merged model ships (`built`: made here, a union, so written);
        `ids`: each model's token -> id; `settings`: the recipe's rows of chosen tokens; `pad_to_multiple_of`: rows
        past the tokenizer's up to a multiple of it, each the mean of the rows (mergekit's); `source`: the recipe."""
        self.inner, self.dirs, self.base, self.tokenizer, self.built = inner, inner.dirs, base, target, built
        self.settings, self.pad, self.source = settings, pad_to_multiple_of, source
        vocab = target.get_vocab()
        self.size = max(vocab.values()) + 1
        self.forced = torch.zeros(self.size, dtype=torch.bool)
        self.forced[[t.token for t in settings if t.force]] = True
        self.rows = {}  # rows[m][i]: the row of target token i in model m (-1: m has no such token)
        for m, own in ids.items():
            rows = [-1] * self.size
            for token, i in vocab.items():
                rows[i] = own.get(token, -1)
            self.rows[m] = torch.tensor(rows, dtype=torch.long)
        self.aligned: dict[str, dict[str, torch.Tensor]] = {}

    def get(self, model: str, name: str) -> torch.Tensor:
        if not self.dirs[model].arch.is_vocab_tensor(name):
            return self.inner.get(model, name)
        if name not in self.aligned:
            self.aligned = {name: self._align(name)}
        return self.aligned[name][model]

    def _align(self, name: str) -> dict[str, torch.Tensor]:
        tensors = {m: self.inner.get(m, name) for m, d in self.dirs.items() if name in d}
        column = (-1,) + (1,) * (next(iter(tensors.values())).dim() - 1)  # a per-row flag against a row (a bias: 1-D)
        rows = {m: self.rows[m].to(t.device) for m, t in tensors.items()}
        present = {m: ((rows[m] >= 0) & (rows[m] < t.shape[0])).view(column) for m, t in tensors.items()}
        own = {m: t[rows[m].clamp(0, t.shape[0] - 1)] * present[m] for m, t in tensors.items()}
        count = sum(p.to(torch.int64) for p in present.values())
        stand_in = sum(own.values()) / count.clamp(min=1).to(next(iter(own.values())).dtype)
        if self.base in tensors:
            stand_in = torch.where(present[self.base], own[self.base], stand_in)
        for setting in self.settings:  # the recipe's `tokens`
            if setting.model is not None and setting.model not in tensors:
                raise EvomergeError(f"{setting.model} has no {name}, which a setting takes a row of", source=self.source,
                                    key="tokens")
            stand_in[setting.token] = tensors[setting.model][setting.row] if setting.model is not None else 0
        forced = self.forced.to(stand_in.device).view(column)
        aligned = {m: torch.where(present[m] & ~forced, own[m], stand_in) for m in tensors}
        if self.pad and self.size % self.pad:
            extra = self.pad - self.size % self.pad
            aligned = {m: torch.cat([t, t.mean(0, keepdim=True).expand(extra, *t.shape[1:])]) for m, t in aligned.items()}
        return aligned


def by_token(sources: Sources, stage: MergeStage | None, tokenizer_from: str | None, source: str) -> Sources:
    """`sources` as they are, or aligned to the tokenizer the merge ships when its stage names a `tokenizer_source`
    (`tokenizer_from`: that model, or the base for `base` and `union`)."""
    if stage is None or not stage.tokenizer_source:
        return sources
    tokenizers = {m: load_tokenizer(d, source) for m, d in sources.dirs.items()}  # each read once
    target, union = tokenizers[tokenizer_from], stage.tokenizer_source == "union"
    if union:
        target = union_tokenizer(target, [(t, embedding_rows(sources.dirs[m])) for m, t in tokenizers.items()
                                          if m != tokenizer_from])
    ids = {m: t.get_vocab() for m, t in tokenizers.items()}
    return TokenAlignedSources(sources, target, ids, stage.base_model, built=union,
                               settings=token_rows(stage, target.get_vocab(), ids, sources.dirs, source),
                               pad_to_multiple_of=stage.pad_to_multiple_of, source=source)


def write_tokenizer(writer: ModelWriter, model_dir: ModelDir, sources: Sources, rows: int | None) -> list[str]:
    """The tokenizer files of `model_dir`, and over them the union tokenizer when the merge built one. Returns a
    warning when the merged embeddings (`rows` rows) were cut below the tokens of the tokenizer copied."""
    writer.copy_tokenizer(model_dir)
    if isinstance(sources, TokenAlignedSources):
        if sources.built:
            writer.save_tokenizer(sources.tokenizer)
        return []
    own = embedding_rows(model_dir)
    if rows is None or own is None or rows >= own:
        return []
    try:
        tokens = len(load_tokenizer(model_dir, str(model_dir.path)))
    except EvomergeError:  # not this check's to report
        return []
    return [f"the merged embeddings have {rows} rows (the smallest vocabulary of the sources), but the tokenizer "
            f"copied from {model_dir.path} has {tokens} tokens: those past {rows} have no row; set tokenizer_source "
            f"(base, a model, or union) to merge the embeddings by token"] if tokens > rows else []
