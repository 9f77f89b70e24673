"""One floating-point code path for training the zoo, so that `zoo build` gives the same bits on any x86-64 CPU.

torch's own CPU kernels and MKL's matrix products each pick an implementation for the processor they find (AVX2,
AVX-512, AMX, ...); the implementations round differently in the last bit, and a few thousand steps of training
amplify that into other weights and other scores. Pinning every library to its AVX2 path (which every x86-64 server
CPU of the last decade has; MKL's conditional numerical reproducibility, strict mode) takes the processor out of the
result. Each library reads its setting once, when it starts, so the variables must be set before torch is imported:
`evomerge zoo build` does so; a Python caller sets them in the environment of its process.
"""

from __future__ import annotations

import os

PINNED = {
    "ATEN_CPU_CAPABILITY": "avx2",  # torch's vectorized CPU kernels
    "MKL_CBWR": "AVX2,STRICT",  # MKL's BLAS (torch's float32 matmuls on CPU)
    "ONEDNN_MAX_CPU_ISA": "AVX2",  # oneDNN, for any op torch routes there
}


def pin_before_torch_import() -> None:
    """Set PINNED in this process's environment (a no-op for libraries already started)."""
    os.environ.update(PINNED)


def unpinned() -> list[str]:
    """What differs from PINNED in this process, as 'NAME=value' lines (empty: the build is reproducible)."""
    import torch

    wrong = [f"{name}={os.environ.get(name)}" for name, value in PINNED.items() if os.environ.get(name) != value]
    capability = torch.backends.cpu.get_cpu_capability()
    if capability != "AVX2":  # set after torch started, or the CPU lacks AVX2
        wrong.append(f"torch CPU capability {capability}")
    return wrong
