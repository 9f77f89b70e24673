"""The zoo's character-level tokenizer: one token per character, built here (no download), saved with every model.

ids: <pad>=0, <unk>=1, <s>=2, </s>=3, then the characters of ALPHABET. Encoding prepends <s> (as Llama tokenizers do),
so lm-eval's HFLM and `AutoTokenizer.from_pretrained(model_dir)` see an ordinary fast tokenizer.
"""

from __future__ import annotations

import string
from pathlib import Path

SPECIALS = ("<pad>", "<unk>", "<s>", "</s>")
ALPHABET = "\n =+-:>.," + string.digits + string.ascii_lowercase + string.ascii_uppercase
PAD, UNK, BOS, EOS = range(4)
VOCAB = {token: i for i, token in enumerate(SPECIALS + tuple(ALPHABET))}


def build_tokenizer():
    """A PreTrainedTokenizerFast over VOCAB: every character is its own token, unknown characters map to <unk>."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # [\s\S]: newlines too
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", BOS)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", padding_side="left")


def save_tokenizer(path: str | Path) -> None:
    build_tokenizer().save_pretrained(str(path))


def encode(text: str) -> list[int]:
    """Token ids of `text` without <s> (the training loop's fast path; equals the tokenizer's ids)."""
    return [VOCAB.get(c, UNK) for c in text]
