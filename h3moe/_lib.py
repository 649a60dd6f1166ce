"""ctypes loader for libh3moe_cuda.so, the C-ABI library built from csrc/ by CMake (see csrc/h3moe.h).

The package imports and works without it. `H3MOE_CUDA=0` skips loading; `H3MOE_LIB=/path/to/lib.so`
points at a library built elsewhere. `call(name, *args)` runs an entry point and raises CudaLibError
with the library's message when it returns a non-zero code.
"""
from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

_HERE = Path(__file__).resolve().parent

_p, _i, _i64, _sz = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_size_t

#: Every exported entry point: name → (restype, argtypes). Mirrors csrc/h3moe.h.
SIGNATURES: dict[str, tuple] = {
    "h3moe_version": (ctypes.c_char_p, []),
    "h3moe_build_info": (ctypes.c_char_p, []),
    "h3moe_error_string": (ctypes.c_char_p, [_i]),
    "h3moe_route_max_experts": (_i, []),
    "h3moe_route_max_topk": (_i, []),
    "h3moe_sort_max_experts": (_i, []),
    "h3moe_sort_workspace_bytes": (_sz, [_i64, _i]),
    # ids, S, E, counts, offsets, sorted_slots, workspace, workspace_bytes, stream
    "h3moe_sort_by_expert": (_i, [_p, _i64, _i, _p, _p, _p, _p, _sz, _p]),
    # logits, dtype, T, E, K, renormalize, weights, ids, sample_len, mask, psum, counts, offsets,
    # sorted_slots, workspace, workspace_bytes, stream
    "h3moe_route_fwd": (_i, [_p, _i, _i64, _i, _i, _i, _p, _p, _i64, _p, _p, _p, _p, _p, _p, _sz, _p]),
    # logits, dtype, T, E, K, renormalize, ids, dweights, sample_len, mask, dpsum, dlogits, stream
    "h3moe_route_bwd": (_i, [_p, _i, _i64, _i, _i, _i, _p, _p, _i64, _p, _p, _p, _p]),
    # dtype, T, H, I, E, K, split_k
    "h3moe_moe_workspace_bytes": (_sz, [_i, _i64, _i, _i, _i, _i, _i]),
    # x, dtype, T, H, I, E, K, w_gate_up, w_down, weights, offsets, sorted_slots, activation, split_k,
    # workspace, workspace_bytes, y, stream
    "h3moe_moe_fwd": (_i, [_p, _i, _i64, _i, _i, _i, _i, _p, _p, _p, _p, _p, _i, _i, _p, _sz, _p, _p]),
}


class CudaLibError(RuntimeError):
    """An entry point of libh3moe_cuda.so returned an error code."""


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
                lib = ctypes.CDLL(str(path))
            except OSError:
                continue
            for name, (restype, argtypes) in SIGNATURES.items():
                fn = getattr(lib, name, None)
                if fn is not None:
                    fn.restype, fn.argtypes = restype, argtypes
            return lib
    return None


@functools.lru_cache(maxsize=None)
def status() -> tuple[bool, str]:
    """(loaded, description): the library's build (version, architectures) or why it is not there."""
    if os.environ.get("H3MOE_CUDA", "1") == "0":
        return False, "disabled by H3MOE_CUDA=0"
    lib = load()
    if lib is None:
        return False, "libh3moe_cuda.so not built (needs nvcc at install time) or not loadable"
    missing = [n for n in SIGNATURES if not hasattr(lib, n)]
    if missing:
        return False, f"libh3moe_cuda.so is stale (missing {', '.join(missing)}): reinstall to rebuild it"
    return True, f"{lib.h3moe_version().decode()} {lib.h3moe_build_info().decode()}"


def error_string(code: int) -> str:
    lib = load()
    return lib.h3moe_error_string(code).decode() if lib is not None else f"error {code}"


def call(name: str, *args) -> None:
    """Run entry point `name`; raise CudaLibError naming it and the library's message on failure."""
    lib = load()
    if lib is None:
        raise CudaLibError(f"{name}: {status()[1]}")
    rc = getattr(lib, name)(*args)
    if rc != 0:
        raise CudaLibError(f"{name} failed: {error_string(rc)} (code {rc})")
