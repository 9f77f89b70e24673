"""Per-document scores: each task's score on each document it was scored on, packed compactly for the ledger.

    docs = {"toy_cipher_gen": array([1., 0., 1., ...]), ...}   # the first n documents of the split, in order
    blob = pack(docs, sizes)      # bytes; 0/1 scores as a bitset (1 bit each), others as float16 (2 bytes each;
                                  # float32 where a score is past float16's range, e.g. a document's perplexity)
    unpack(blob) -> (docs, sizes)

A blob is one JSON header line `[[task, scored, total, kind], ...]`, a NUL byte, then each task's payload in header
order. `total` is the task's number of documents on that split, so a candidate stopped early (racing) says how many it
was not scored on. 1,000 trials x 1,000 documents of exact match take 125 KB.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import numpy as np

BITS = "bits"
FLOATS = {"f16": "<f2", "f32": "<f4"}  # kind -> stored dtype


def pack(docs: Mapping[str, np.ndarray], sizes: Mapping[str, int]) -> bytes:
    header, payload = [], []
    for task, values in docs.items():
        values = np.asarray(values, dtype=np.float64)
        if np.all((values == 0) | (values == 1)):
            kind, data = BITS, np.packbits(values.astype(bool)).tobytes()
        else:
            kind = "f16" if np.all(np.abs(values) <= np.finfo(np.float16).max) else "f32"
            data = values.astype(FLOATS[kind]).tobytes()
        header.append([task, len(values), int(sizes[task]), kind])
        payload.append(data)
    return json.dumps(header, separators=(",", ":")).encode() + b"\0" + b"".join(payload)


def unpack(blob: bytes) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    head, _, body = bytes(blob).partition(b"\0")
    docs, sizes, offset = {}, {}, 0
    for task, scored, total, kind in json.loads(head):
        dtype = np.dtype(np.uint8 if kind == BITS else FLOATS[kind])
        nbytes = (scored + 7) // 8 if kind == BITS else dtype.itemsize * scored
        chunk = np.frombuffer(body[offset:offset + nbytes], dtype=dtype)
        docs[task] = (np.unpackbits(chunk)[:scored] if kind == BITS else chunk).astype(np.float64)
        sizes[task] = total
        offset += nbytes
    return docs, sizes


def completed(blob: bytes | None) -> np.ndarray | None:
    """One score per document of every task (tasks in blob order): documents a candidate was not scored on get its
    mean on that task's scored ones, the unbiased estimate of what it would have scored there. None without a blob."""
    if blob is None:
        return None
    docs, sizes = unpack(blob)
    parts = [np.concatenate([v, np.full(sizes[t] - len(v), v.mean() if len(v) else 0.0)]) for t, v in docs.items()]
    return np.concatenate(parts) if parts else None


def count(blob: bytes | None) -> int:
    """Documents scored (summed over tasks)."""
    return 0 if blob is None else sum(len(v) for v in unpack(blob)[0].values())
