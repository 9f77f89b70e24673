"""Counter-based random numbers for DARE/DELLA masks: the same (seed, tensor, model) gives the same mask on any device.

Element i of a tensor draws `hash(key, i)`, a stateless integer hash, so there is no generator state, no dependence on
the torch global RNG, on the device, or on the order in which tensors are merged. All arithmetic is int64 on values
below 2**63, so it never overflows and is bit-identical on CPU and CUDA.
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


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for x < 2**32 with no int64 overflow: a c >= 2**31 is split into 16-bit halves."""
    if c < 2**31:
        return (x * c).bitwise_and_(_M32)
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + ((x * hi).bitwise_and_(0xFFFF) << 16)).bitwise_and_(_M32)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 (C. Wellons, hash-prospector): a bijection of 32-bit integers with strong avalanche."""
    x = _mul32(x ^ (x >> 16), 0x7FEB352D)
    x ^= x >> 15
    x = _mul32(x, 0x846CA68B)
    x ^= x >> 16
    return x


def uniform(key: MaskKey, shape: torch.Size | tuple[int, ...], device: torch.device | str = "cpu") -> torch.Tensor:
    """float32 tensor of `shape` with independent U[0, 1) entries (multiples of 2**-24) determined by `key` alone."""
    k0, k1 = key.words()
    index = torch.arange(torch.Size(shape).numel(), dtype=torch.int64, device=device)
    h = _mix32((index & _M32) ^ k0)
    if index.numel() > 2**32:  # entries past 2**32 get distinct draws too
        h = _mix32(h ^ (index >> 32))
    h = _mix32(h ^ k1)
    return ((h >> 8).to(torch.float32) * 2.0**-24).reshape(shape)
