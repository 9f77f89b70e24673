"""Counter-based random numbers for DARE/DELLA masks: the same (seed, tensor, model) gives the same mask on any device.

Element i of a tensor draws `hash(key, i)`, a stateless integer hash, so there is no generator state, no dependence on
the torch global RNG, on the device, or on the order in which tensors are merged. The hash runs on int32 tensors: a
uint32 value is held in its two's-complement bits, multiplication wraps mod 2**32 (the multiply-low of every CPU and
GPU), and right shifts are made logical by masking, so the bits are the same on CPU and CUDA.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

_M32 = 0xFFFFFFFF


@dataclass(frozen=True)
class MaskKey:
    """Names one random stream: the recipe's seed, the tensor, and the model whose delta is masked (the materializer
    names it by its position among the merged models, so that where the model is stored does not matter)."""

    seed: int
    tensor: str
    model: str

    def words(self) -> tuple[int, int]:
        """Two 32-bit words of blake2b(seed, tensor, model)."""
        text = f"{self.seed}\x00{self.tensor}\x00{self.model}".encode()
        digest = int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")
        return digest & _M32, digest >> 32


_FACTORS = (0x7FEB352D, 0x846CA68B - 2**32)  # uint32 factors as int32 values (their two's-complement bits)


def _shr(x: torch.Tensor, s: int, out: torch.Tensor) -> torch.Tensor:
    """Logical right shift of int32 bits into `out` (torch's >> on int32 is arithmetic: the sign bits are masked off)."""
    return torch.bitwise_right_shift(x, s, out=out).bitwise_and_((1 << (32 - s)) - 1)


def _mix32_(x: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """lowbias32 (C. Wellons, hash-prospector), a bijection of 32-bit integers with strong avalanche, on int32 bits in
    place (`tmp`: scratch of x's shape; every op writes into memory it has, which is most of the cost on CPU):
    x ^= x >> 16;  x *= 0x7FEB352D;  x ^= x >> 15;  x *= 0x846CA68B;  x ^= x >> 16."""
    for shift, factor in zip((16, 15), _FACTORS):
        x ^= _shr(x, shift, tmp)
        x.mul_(factor)
    x ^= _shr(x, 16, tmp)
    return x


def key_words(keys: list[MaskKey], device: torch.device | str = "cpu") -> torch.Tensor:
    """int32 [len(keys), 2]: each key's two words, as their two's-complement bits."""
    return torch.tensor([key.words() for key in keys], dtype=torch.int64).to(torch.int32).to(device)


def draws(words: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """float32 [len(words), *shape]: u_j = mix(mix(j ^ k0) ^ k1) >> 8 for entry j of row (k0, k1) (past 2**32 entries
    mix(... ^ (j >> 32)) in between). All rows are drawn in one pass: the models of a tensor share each op."""
    n = torch.Size(shape).numel()
    k0, k1 = words.T[:, :, None]
    index = torch.arange(n, dtype=torch.int32 if n <= 2**31 else torch.int64, device=words.device)
    h = torch.bitwise_xor(index.to(torch.int32), k0)  # [keys, n]
    tmp = torch.empty_like(h)
    _mix32_(h, tmp)
    if n > 2**32:  # entries past 2**32 get distinct draws too
        _mix32_(h.bitwise_xor_((index >> 32).to(torch.int32)), tmp)
    _mix32_(h.bitwise_xor_(k1), tmp)
    return _shr(h, 8, tmp).to(torch.float32).mul_(2.0**-24).reshape(len(words), *shape)

