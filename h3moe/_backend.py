"""The one place that decides which backend runs an op.

Backends, fastest first: "cuda" (hand-written kernels in csrc/, loaded by ctypes), "triton" (the main GPU
path; also runs on CPU tensors under TRITON_INTERPRET=1), "torch" (vectorized PyTorch, runs anywhere).
Availability is probed once. `H3MOE_BACKEND=<name>` overrides "auto". "auto" quietly skips a backend that
cannot run an op here; an explicit backend that cannot raises an error that says why.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from dataclasses import dataclass

import torch

BACKENDS = ("cuda", "triton", "torch")

# Ops each backend implements; a backend module adds to its set when it registers an op.
# Ops: "route", "moe", "gating_loss", "quant_moe".
_OPS: dict[str, set[str]] = {"torch": {"route", "moe", "gating_loss", "quant_moe"}, "triton": set(), "cuda": set()}


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run here (the message says why)."""


@dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool  # can run on this machine's default device
    reason: str  # why not, or what it runs on
    ops: tuple[str, ...] = ()

    def __str__(self) -> str:
        return f"{self.name}: {'yes' if self.available else 'no'} ({self.reason})"


def register_ops(backend: str, *ops: str) -> None:
    _OPS[backend].update(ops)


def eager_direct(*tensors) -> bool:
    """Whether a call may run a custom op's implementation directly instead of through the dispatcher, which
    costs about 25 µs of Python per op call (a whole decode step's GPU time on a small model): eager (not
    traced by torch.compile), no torch dispatch mode (FakeTensor, functionalization, ...), no functorch
    transform, plain tensors on a real device, and no gradient to record. Everything else takes the op (and
    its fake and autograd). `tensors` may hold None."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() \
            or torch._C._functorch.peek_interpreter_stack() is not None:
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is None:
            continue
        if type(t) is not torch.Tensor and type(t) is not torch.nn.Parameter:
            return False
        if (grad and t.requires_grad) or t.device.type == "meta":
            return False
    return True


def device_guard(t: torch.Tensor):
    """A context that makes t's GPU the current device where it is not (else a no-op). Triton launches on the
    current device, whatever device its pointers live on: a layer placed on cuda:1 by transformers'
    device_map="auto" (accelerate moves the inputs, not the current device) would otherwise run its kernels on
    cuda:0 against cuda:1's memory. Entered around each Triton op's eager call; autograd runs a device's
    backward in a thread already set to that device, and compiled graphs set their device themselves."""
    if t.device.type != "cuda" or torch.compiler.is_compiling() or t.device.index is None \
            or t.device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(t.device)


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _cuda_lib_status() -> tuple[bool, str]:
    from . import _lib

    return _lib.status()


def _status(name: str) -> BackendStatus:
    has_gpu = torch.cuda.is_available()
    if name == "torch":
        return BackendStatus(name, True, "cuda and cpu" if has_gpu else "cpu", tuple(sorted(_OPS[name])))
    if name == "triton":
        _load_backend_modules()
        if not _triton_installed():
            return BackendStatus(name, False, "triton is not installed (pip install h3moe[triton])")
        if has_gpu:
            return BackendStatus(name, True, "cuda", tuple(sorted(_OPS[name])))
        if interpreter_enabled():
            return BackendStatus(name, True, "no GPU, interpreter only (TRITON_INTERPRET=1)", tuple(sorted(_OPS[name])))
        return BackendStatus(name, False, "no GPU (set TRITON_INTERPRET=1 to run the kernels in the interpreter)")
    if name == "cuda":
        _load_backend_modules()
        ok, why = _cuda_lib_status()
        if not ok:
            return BackendStatus(name, False, why)
        if not has_gpu:
            return BackendStatus(name, False, f"no GPU (library built: {why})")
        return BackendStatus(name, True, why, tuple(sorted(_OPS[name])))
    raise ValueError(f"backend: expected one of {BACKENDS} or 'auto', got {name!r}")


def backends() -> dict[str, BackendStatus]:
    """Which backends can run here, and why not where one cannot."""
    return {name: _status(name) for name in BACKENDS}


@functools.lru_cache(maxsize=None)
def _load_backend_modules() -> None:
    """Import the op modules so that each backend has registered the ops it implements."""
    from .ops import experts, losses, routing  # noqa: F401

    for mod in ("h3moe.ops.cuda", "h3moe.ops.quant", "h3moe.ops.triton_experts", "h3moe.ops.triton_routing", "h3moe.ops.triton_gating"):
        try:
            importlib.import_module(mod)
        except ImportError:
            pass


def _can_run(name: str, op: str, device: torch.device) -> tuple[bool, str]:
    if op not in _OPS[name]:
        return False, f"backend {name!r} does not implement {op!r}"
    if name == "torch":
        return True, ""
    if name == "triton":
        if not _triton_installed():
            return False, "triton is not installed (pip install h3moe[triton])"
        if device.type == "cuda":
            return True, ""
        if device.type == "cpu" and interpreter_enabled():
            return True, ""
        return False, f"triton runs on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1); got {device.type}"
    if name == "cuda":
        ok, why = _cuda_lib_status()
        if not ok:
            return False, why
        if device.type != "cuda":
            return False, f"the cuda backend needs CUDA tensors; got {device.type}"
        return True, ""
    return False, f"unknown backend {name!r}"


def auto_requested() -> bool:
    """No H3MOE_BACKEND override: "auto" may apply per-shape preferences."""
    return os.environ.get("H3MOE_BACKEND", "auto") in ("", "auto")


def resolve(backend: str, device: torch.device, op: str) -> str:
    """Pick the backend that runs `op` on tensors on `device`."""
    if backend == "auto":
        backend = os.environ.get("H3MOE_BACKEND", "auto") or "auto"
    if backend not in BACKENDS and backend != "auto":
        raise ValueError(f"backend: expected one of {BACKENDS} or 'auto', got {backend!r}")
    _load_backend_modules()
    if backend != "auto":
        ok, why = _can_run(backend, op, device)
        if not ok:
            raise BackendUnavailable(f"backend {backend!r} cannot run {op!r} here: {why}")
        return backend
    if device.type != "cuda":
        return "torch"  # the interpreter is for tests, never picked automatically
    for name in BACKENDS:
        if _can_run(name, op, device)[0]:
            return name
    return "torch"


def runs(name: str, op: str, device: torch.device) -> bool:
    """Whether backend `name` can run `op` on `device` (a constant for torch.compile, as resolve())."""
    _load_backend_modules()
    return _can_run(name, op, device)[0]


runs._dynamo_marked_constant = True


# torch.compile treats resolve() as a constant (what torch.compiler.assume_constant_result sets), so tracing
# h3moe ops never steps into the module probing. Set directly: the decorator imports torch._dynamo (and with
# it triton) at h3moe import time.
resolve._dynamo_marked_constant = True
