"""ctypes loader for libh3moe_cuda.so, the C-ABI library built from csrc/ by CMake.

The package imports and works without it. `H3MOE_CUDA=0` skips loading; `H3MOE_LIB=/path/to/lib.so`
points at a library built elsewhere.
"""
from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

_HERE = Path(__file__).resolve().parent


def candidates() -> list[Path]:
    out = []
    if os.environ.get("H3MOE_LIB"):
        out.append(Path(os.environ["H3MOE_LIB"]))
    out += [_HERE / "lib" / "libh3moe_cuda.so", _HERE.parent / "build" / "csrc" / "libh3moe_cuda.so"]
    return out


@functools.lru_cache(maxsize=None)
def load() -> ctypes.CDLL | None:
    if os.environ.get("H3MOE_CUDA", "1") == "0":
        return None
    for path in candidates():
        if path.exists():
            try:
                return ctypes.CDLL(str(path))
            except OSError:
                continue
    return None


@functools.lru_cache(maxsize=None)
def status() -> tuple[bool, str]:
    """(loaded, description): the library's build (version, architectures) or why it is not there."""
    if os.environ.get("H3MOE_CUDA", "1") == "0":
        return False, "disabled by H3MOE_CUDA=0"
    lib = load()
    if lib is None:
        return False, "libh3moe_cuda.so not built (needs nvcc at install time) or not loadable"
    try:
        lib.h3moe_version.restype = ctypes.c_char_p
        lib.h3moe_build_info.restype = ctypes.c_char_p
        return True, f"{lib.h3moe_version().decode()} {lib.h3moe_build_info().decode()}"
    except AttributeError:
        return True, "libh3moe_cuda.so (no build info)"
