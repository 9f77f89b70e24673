"""Where the merge reads its input tensors from: a store of source tensors, asked tensor by tensor.

`merge_to_dir` reads lazily from disk (LazySources). A search worker keeps one store for the whole run (its
`workers.sources`): ResidentSources (every tensor on its device), HostSources (in host memory, each input copied to the
device as the merge reaches it) or MappedSources (the memory-mapped files, read per tensor). The last two hold views of
the files' mappings, so the workers of a node share one copy of the sources through the page cache.
"""

from __future__ import annotations

from typing import Protocol

import torch

from evomerge.models.io import ModelDir

Key = tuple[str, str]  # (model, tensor name)


class Sources(Protocol):
    dirs: dict[str, ModelDir]

    def get(self, model: str, name: str) -> torch.Tensor: ...


class LazySources:
    """Reads each input tensor from disk when asked, on the merge device, in the compute dtype."""

    def __init__(self, dirs: dict[str, ModelDir], device: str, dtype: torch.dtype | None):
        self.dirs, self.device, self.dtype = dirs, device, dtype

    def get(self, model: str, name: str) -> torch.Tensor:
        return self.dirs[model].get(name, device=self.device, dtype=self.dtype)


class ResidentSources:
    """Every tensor of every source model, loaded once onto the device."""

    def __init__(self, dirs: dict[str, ModelDir], device: str, dtype: torch.dtype | None):
        self.dirs = dirs
        self.tensors = {(m, n): d.get(n, device=device, dtype=dtype) for m, d in dirs.items() for n in d.tensor_names}

    @classmethod
    def from_tensors(cls, dirs: dict[str, ModelDir], tensors: dict[Key, torch.Tensor]) -> "ResidentSources":
        """A store over tensors already resident (e.g. the parameters of live source models)."""
        store = cls.__new__(cls)
        store.dirs, store.tensors = dirs, tensors
        return store

    def get(self, model: str, name: str) -> torch.Tensor:
        return self.tensors[(model, name)]


class MappedSources:
    """Every source tensor as a view of its memory-mapped safetensors file (safetensors maps each file once, copy on
    write): no data is read until a merge reads it, the page cache holds it, and the workers of a node share that one
    copy (the kernel may evict pages and read them again). `get` gives the tensor on the merge device in the compute
    dtype: on a CPU worker whose compute dtype is the stored one, the mapped view itself."""

    def __init__(self, dirs: dict[str, ModelDir], device: str, dtype: torch.dtype | None,
                 resident: dict[Key, torch.Tensor] | None = None):
        """`resident`: tensors already on the device (the layers a layer path runs), read from there, not mapped."""
        self.dirs, self.device, self.dtype = dirs, device, dtype
        self.resident = resident or {}
        self.tensors = {(m, n): d.get(n) for m, d in dirs.items() for n in d.tensor_names if (m, n) not in self.resident}
        self.tensors.update(self.resident)

    def get(self, model: str, name: str) -> torch.Tensor:
        return self.tensors[(model, name)].to(device=self.device, dtype=self.dtype)


class HostSources(MappedSources):
    """Every source tensor in host memory, copied to the merge device as the merge reaches it. Built on the files'
    mappings: a tensor stored in the compute dtype stays a view of its mapping (one copy per node) and is read through
    once now, so no candidate waits on the disk; one stored in another dtype is converted once, into this worker's own
    memory."""

    def __init__(self, dirs: dict[str, ModelDir], device: str, dtype: torch.dtype | None,
                 resident: dict[Key, torch.Tensor] | None = None):
        super().__init__(dirs, device, dtype, resident)
        for key, view in self.tensors.items():
            if key in self.resident:
                continue
            if dtype is not None and view.dtype != dtype:
                self.tensors[key] = view.to(dtype)
            else:
                _read_through(view)
        for d in dirs.values():  # the views kept hold their mappings; a file whose every tensor was converted is unmapped
            d.close()

    def get(self, model: str, name: str) -> torch.Tensor:
        return self.tensors[(model, name)].to(self.device)


def _read_through(view: torch.Tensor) -> None:
    """Reads one byte of every page of a mapped tensor (contiguous, as safetensors lays them out) into memory."""
    if view.numel():
        view.reshape(-1).view(torch.uint8)[::4096].sum()
