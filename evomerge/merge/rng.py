"""Counter-based random numbers for DARE/DELLA masks: the same (seed, tensor, model) gives the same mask on any device.

Element i of a tensor draws `hash(key, i)`, a stateless integer hash, so there is no generator state, no dependence on
the torch global RNG, on the device, or on the order in which tensors are merged. The hash runs on int32 tensors: a
uint32 value is held in its two's-complement bits, multiplication wraps mod 2**32 (the multiply-low of every CPU and
GPU), and right shifts are made logical by masking, so the bits are the same on CPU and CUDA. int32 is half the memory
traffic of int64 and needs no overflow-free multiply, which makes a mask several times cheaper. On CPU the same hash
runs on numpy's native uint32 (`_draws_numpy`); tests check that both give the same bits. `uniforms` draws the masks
of all models of a tensor in one pass, and `memoize_draws` lets a search worker keep them across candidates.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from evomerge.merge.host import on_host

_M32 = 0xFFFFFFFF


@dataclass(frozen=True)
class MaskKey:
    """Names one random stream: the recipe's seed, the tensor, and the model whose delta is masked."""

    seed: int
    tensor: str
    model: str

    def words(self) -> tuple[int, int]:
        """Two 32-bit words of blake2b(seed, tensor, model)."""
        text = f"{self.seed}\x00{self.tensor}\x00{self.model}".encode()
        digest = int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")
        return digest & _M32, digest >> 32


def _signed(word: int) -> int:
    """The int32 holding the uint32 `word`."""
    return word - 2**32 if word >= 2**31 else word


def _int32(word: int) -> torch.Tensor | int:
    """The uint32 `word` as an int32 operand: eagerly a 0-dim int32 tensor (an op with it runs the int32 kernel; a
    Python int goes through a slow int64 path), while torch.compile traces the plain int (a CPU tensor constant inside
    a GPU kernel is a device copy at best)."""
    if torch.compiler.is_compiling():
        return _signed(word)
    if word not in _CONSTANTS:
        _CONSTANTS[word] = torch.tensor(_signed(word), dtype=torch.int32)
    return _CONSTANTS[word]


_CONSTANTS: dict[int, torch.Tensor] = {}
_MUL = (0x7FEB352D, 0x846CA68B)


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int32 bits (torch's >> on int32 is arithmetic)."""
    return (x >> s).bitwise_and_(_int32((1 << (32 - s)) - 1))


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 (C. Wellons, hash-prospector): a bijection of 32-bit integers with strong avalanche, on int32 bits."""
    x = x ^ _shr(x, 16)
    x.mul_(_int32(_MUL[0]))
    x ^= _shr(x, 15)
    x.mul_(_int32(_MUL[1]))
    x ^= _shr(x, 16)
    return x


def _draw(low: torch.Tensor, k0: torch.Tensor, k1: torch.Tensor, high: torch.Tensor | None) -> torch.Tensor:
    """U[0, 1) from the index bits (int32 `low`, and `high` past 2**32) and the key words (int32 [keys, 1]): a row per
    key, so the models of a tensor share each op (the ops are so cheap that dispatching them is much of the cost)."""
    h = _mix32(low ^ k0)
    if high is not None:
        h = _mix32(h ^ high)
    h = _mix32(h ^ k1)
    return _shr(h, 8).to(torch.float32).mul_(2.0**-24)


class _Memo:
    """Draws kept for reuse, up to a byte budget (first come, first kept): see `memoize_draws`."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.nbytes, self.draws = max_bytes, 0, {}

    def keep(self, key: tuple, draws: torch.Tensor) -> None:
        if self.nbytes + draws.nbytes <= self.max_bytes:
            self.draws[key] = draws
            self.nbytes += draws.nbytes


_memo: _Memo | None = None


def memoize_draws(max_bytes: int) -> None:
    """Keep up to `max_bytes` of draws (4 bytes per element and model) and return them again for the same keys and
    shape: a search worker redraws the very same masks for every candidate (the keys hold the recipe's seed, not the
    candidate), so with the draws resident DARE and DELLA masks cost one comparison. 0 turns it off and frees them."""
    global _memo
    _memo = _Memo(max_bytes) if max_bytes > 0 else None


def kept_draw_bytes() -> int:
    return _memo.nbytes if _memo is not None else 0


def _draws_torch(keys: list[MaskKey], n: int, device: torch.device | str) -> torch.Tensor:
    """[len(keys), n] draws by the int32 hash (any device)."""
    words = key_words(tuple(keys), str(device))
    index = torch.arange(n, dtype=torch.int32 if n <= 2**31 else torch.int64, device=device)
    high = (index >> 32).to(torch.int32) if n > 2**32 else None  # entries past 2**32 get distinct draws too
    return _draw(index.to(torch.int32), words[:, :1], words[:, 1:], high)


def _draws_numpy(keys: list[MaskKey], n: int) -> torch.Tensor:
    """[len(keys), n] draws (n <= 2**32) by the same hash on numpy's native uint32: logical shifts need no mask and
    every op writes in place, 2-3x faster than the int32 emulation in eager torch on CPU."""
    words = np.array([key.words() for key in keys], dtype=np.uint32)
    x, tmp = np.arange(n, dtype=np.uint32) ^ words[:, :1], np.empty((len(keys), n), dtype=np.uint32)

    def mix32(x):  # lowbias32, as _mix32
        for shift, factor in ((16, 0x7FEB352D), (15, 0x846CA68B)):
            x ^= np.right_shift(x, shift, out=tmp)
            x *= np.uint32(factor)
        x ^= np.right_shift(x, 16, out=tmp)

    mix32(x)
    x ^= words[:, 1:]
    mix32(x)
    x >>= 8
    return torch.from_numpy(x.astype(np.float32)).mul_(2.0**-24)


@functools.lru_cache(maxsize=65536)
def key_words(keys: tuple[MaskKey, ...], device: str) -> torch.Tensor:
    """int32 [len(keys), 2]: the keys' words on `device`, copied there once (a search asks for the same keys for every
    candidate; a copy per call would stall a GPU's queue)."""
    return torch.tensor([[_signed(w) for w in key.words()] for key in keys], dtype=torch.int32, device=device)


def draws_at(index: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """The draws of one key (`words`, a row of `key_words`) at int32 element indices: `uniform` of that key, computed
    where it is used, so inside a fused kernel a mask costs arithmetic instead of reading stored draws."""
    return _draw(index, words[0], words[1], None)


def uniforms(keys: list[MaskKey], shape: torch.Size | tuple[int, ...], device: torch.device | str = "cpu") -> torch.Tensor:
    """float32 tensor [len(keys), *shape]: row i is `uniform(keys[i], shape)`, drawn for all keys at once (read-only:
    with `memoize_draws` on, the same tensor is returned again)."""
    memo_key = (tuple(keys), tuple(shape), str(device))
    if _memo is not None and memo_key in _memo.draws:
        return _memo.draws[memo_key]
    n = torch.Size(shape).numel()
    in_numpy = on_host(device) and n <= 2**32
    draws = (_draws_numpy(keys, n) if in_numpy else _draws_torch(keys, n, device)).reshape(len(keys), *shape)
    if _memo is not None:
        _memo.keep(memo_key, draws)
    return draws


def uniform(key: MaskKey, shape: torch.Size | tuple[int, ...], device: torch.device | str = "cpu") -> torch.Tensor:
    """float32 tensor of `shape` with independent U[0, 1) entries (multiples of 2**-24) determined by `key` alone."""
    return uniforms([key], shape, device)[0]
