"""Counter-based random numbers for DARE/DELLA masks: the same (seed, tensor, model) gives the same mask on any device.

Element i of a tensor draws `hash(key, i)`, a stateless integer hash, so there is no generator state, no dependence on
the torch global RNG, on the device, or on the order in which tensors are merged. The hash runs on int32 tensors: a
uint32 value is held in its two's-complement bits, multiplication wraps mod 2**32 (the multiply-low of every CPU and
GPU), and right shifts are made logical by masking, so the bits are the same on CPU and CUDA. int32 is half the memory
traffic of int64 and needs no overflow-free multiply, which makes a mask several times cheaper.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

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


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int32 bits (torch's >> on int32 is arithmetic)."""
    return (x >> s).bitwise_and_((1 << (32 - s)) - 1)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 (C. Wellons, hash-prospector): a bijection of 32-bit integers with strong avalanche.

    On int32 bits (wrapping); an int64 tensor of values below 2**32 is mapped through it and returned as int64.
    """
    if x.dtype == torch.int64:
        return _mix32(x.to(torch.int32)).to(torch.int64).bitwise_and_(_M32)
    x = x ^ _shr(x, 16)
    x.mul_(0x7FEB352D)
    x ^= _shr(x, 15)
    x.mul_(_signed(0x846CA68B))
    x ^= _shr(x, 16)
    return x


def _draw(low: torch.Tensor, k0: torch.Tensor, k1: torch.Tensor, high: torch.Tensor | None) -> torch.Tensor:
    """U[0, 1) from the index bits (int32 `low`, and `high` past 2**32) and the key words (0-dim int32)."""
    h = _mix32(low ^ k0)
    if high is not None:
        h = _mix32(h ^ high)
    h = _mix32(h ^ k1)
    return _shr(h, 8).to(torch.float32) * 2.0**-24


_kernel = _draw  # or its torch.compile'd form, see compile_rng


def compile_rng(enabled: bool = True) -> None:
    """Fuse the ~25 element-wise integer ops of a draw into one kernel with torch.compile (same bits: the same int32
    ops). It costs ~30 s of compilation once per process and makes masks ~25x cheaper on CPU; on a GPU the eager ops
    would each read and write the whole index tensor, so a search worker there should turn it on."""
    global _kernel
    _kernel = torch.compile(_draw, dynamic=True) if enabled else _draw


def uniform(key: MaskKey, shape: torch.Size | tuple[int, ...], device: torch.device | str = "cpu") -> torch.Tensor:
    """float32 tensor of `shape` with independent U[0, 1) entries (multiples of 2**-24) determined by `key` alone."""
    k0, k1 = (torch.tensor(_signed(w), dtype=torch.int32) for w in key.words())  # CPU scalars: no host-device copy
    n = torch.Size(shape).numel()
    index = torch.arange(n, dtype=torch.int32 if n <= 2**31 else torch.int64, device=device)
    high = (index >> 32).to(torch.int32) if n > 2**32 else None  # entries past 2**32 get distinct draws too
    return _kernel(index.to(torch.int32), k0, k1, high).reshape(shape)  # int32: the low 32 bits of the index
