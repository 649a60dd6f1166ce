"""Triton backend of h3moe.moe: launchers, custom ops h3moe::triton_experts_fwd / _bwd, autograd, and the
config selection (tuned JSON files, autotuning keyed on shapes only, pinned defaults).

Forward (kernels in h3moe/kernels/experts.py):
    A (S, I) = act(x_gathered @ Wg^T) * (x_gathered @ Wu^T)      _gate_up_kernel
    out[slot] = w[slot] * (A @ Wd^T)                             _down_kernel, rows scattered to slots
    y (T, H) = sum over the K slots of out (fp32, deterministic)  ops/combine.py (one pass); K=1: y directly
Backward: _gate_up_kernel(BWD) computes dA' = dy @ Wd and, from the gate/up pre-activation (saved by the
forward, or recomputed in the same K-loop: H3MOE_RECOMPUTE=1 / moe(recompute=True)), emits dH (S, 2I), A and
the partial d(routing weight); d(x) with _down_kernel (transposed w_gate_up) + the same K-sum; d(w_gate_up)
and d(w_down) with _wgrad_kernel. Saved for backward: the op's inputs, plus h (S, 2I) unless recomputing.

Combine (K > 1), H3MOE_COMBINE:
  fp32 (default): each slot's row written once into an (S, H) fp32 buffer, summed over K in fp32 by the
      combine kernel: deterministic, one rounding (to y's dtype) at the end.
  lowp: the same with the slot rows in x's dtype: half the bytes written and read (S*H*2 instead of *4;
      the fwd of a K=8 layer moves ~S*H*8 bytes through this buffer), deterministic, but each slot is rounded
      to 16 bits before the sum, as eager PyTorch and vLLM's fused_moe round it. Also used for d(x).
  atomic (or H3MOE_ATOMIC_COMBINE=1): the slots added into an fp32 (T, H) buffer with float atomics: less
      memory, run-to-run rounding varies.

Configs, per kernel role and key (role, S-bucket, H, I, E, K, dtype) — S = T*K bucketed to a power of two:
  1. A config this process autotuned for the key (not with H3MOE_AUTOTUNE=0).
  2. A tuned JSON file h3moe/configs/E={E},H={H},I={I},dtype={dt},device_name={name}.json (vLLM style;
     see h3moe/configs/README.md; H3MOE_CONFIG_DIR=<folder> reads another folder): the entry of the
     nearest S-bucket. A missing file falls back.
     H3MOE_TUNED=0 ignores the files.
  3. H3MOE_AUTOTUNE=0, CUDA graph capture, or no GPU: the pinned default (kernels.experts.default_config).
  4. Otherwise the first call with a new key benchmarks the candidates with triton.testing.do_bench (this
     synchronizes the host once per key) and caches the winner in memory; `save_tuned(path)` writes them as
     JSON. During CUDA graph capture no benchmark runs: a key not yet tuned takes the default, so warm up
     once before capturing if you want the tuned configs. Warm up at the token counts you capture in any
     case (as torch.cuda.graph's documentation asks): Triton loads a kernel variant's module at its first
     launch, which a capturing stream does not allow. The kernels do not specialize on batch-dependent
     integers (do_not_specialize), so one eager call per config (per regime of rows per expert) covers every
     batch size that takes it.
  A config that does not load on this GPU (OutOfResources: the defaults are sized for A100 / H100 shared
  memory; sm_86 / 89 / 120 cards allow ~100 KB per block) falls through to the next candidate (_launch).
So H3MOE_AUTOTUNE=0 means "no benchmarking at run time" (committed tuned files still apply); with
H3MOE_TUNED=0 as well, every launch takes the pinned default.
Candidates and defaults depend on the GPU architecture (Hopper-only tiles are left out on sm_80).

Tensor descriptors (TMA, Config.TMA): the "large" candidates include Hopper configs that load the dense
operands (weights; the down / d(x) / weight-gradient kernels' sorted rows too) through per-expert tensor
descriptors made on the device (tl.make_tensor_descriptor: 128 bytes of global scratch per descriptor and
program, from triton.set_allocator: h3moe sets a torch allocator where none is set). H3MOE_TMA:
  0 (default, until a GPU run has checked them): the Tma candidates are left out, every launch loads through
    pointers (a tuned file's Tma config runs its tiles without descriptors);
  auto: the tuner also times the Tma candidates, and a config with TMA uses descriptors;
  1: every launch that can uses them (16-bit, sm_90+, 16-byte aligned pointers and row strides; the
    interpreter too); a launch that cannot runs the same tiles without.
tma_smoke() runs them once in a child process and says whether they run and agree on this GPU (the bench's
h3moe:triton-tma rows and scripts/gpu_followup.sh's H3MOE_TMA=auto wait for it).

Weight gradients through torch's grouped matmul (TORCH_GMM, H3MOE_WGRAD_GMM): on sm_90 in 16 bits, the
large-tile candidates of wgrad_gu / wgrad_down also hold torch.nn.functional.grouped_mm (CUTLASS), dW_e =
left_e^T @ right_e on the same sorted operands, its result in the weight's own layout; the tuner keeps
whichever is faster, a tuned file writes it as {"impl": "torch.grouped_mm"}. H3MOE_WGRAD_GMM=0 leaves it
out, =1 takes it wherever it runs (the interpreter's CPU tensors too). Not on Blackwell: its grouped_mm
writes garbage into the gradient of an expert with no row (pytorch/pytorch#172439).
Tune and save for one model shape: `python -m h3moe.ops.triton_experts --E 8 --H 4096 --I 14336 --K 2`.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import warnings
from pathlib import Path

import torch

from .. import _backend, _validate
from ..reference import ACTIVATIONS
from .combine import combine
from .routing import Routing

__all__ = ["moe", "experts_fwd", "experts_fwd_saved", "experts_bwd", "save_tuned", "config_for", "tune"]

if __name__ == "__main__":
    # `python -m h3moe.ops.triton_experts --E 8 --H 4096 --I 14336 --K 2`: run the CLI of the package's own
    # module (importing it registers the custom ops once; this __main__ copy must not register them again).
    from h3moe.ops.triton_experts import _main

    _main()
    raise SystemExit(0)

#: Tuned JSON configs: h3moe/configs/, or the folder H3MOE_CONFIG_DIR names (read at import).
_CONFIG_DIR = Path(os.environ.get("H3MOE_CONFIG_DIR") or Path(__file__).resolve().parent.parent / "configs")
_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


_K = None


def _kernels():
    global _K
    if _K is None:
        from ..kernels import experts as k  # lazy: importing h3moe must not import triton

        _K = k
    return _K


def _s_bucket(S: int) -> int:
    return 1 << max(0, (max(S, 1) - 1).bit_length())


@functools.lru_cache(maxsize=None)
def _device_name_of(index) -> str:
    return torch.cuda.get_device_name(index).replace(" ", "_")


def _device_name(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    return _device_name_of(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _arch_of(index) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return major * 10 + minor


def _arch(device: torch.device) -> int:
    """Compute capability as major*10+minor (90 on Hopper); 90 off the GPU (the interpreter ignores it)."""
    return _arch_of(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else 90


def _json_name(E: int, H: int, I: int, dt: str, device_name: str) -> str:
    return f"E={E},H={H},I={I},dtype={dt},device_name={device_name}.json"


def _load_json(name: str) -> dict | None:
    return _load_json_at(str(_CONFIG_DIR / name))


@functools.lru_cache(maxsize=None)
def _load_json_at(path: str) -> dict | None:
    """A tuned file's table, read once per path (the folder is part of the key: H3MOE_CONFIG_DIR and
    _CONFIG_DIR can differ between calls)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        warnings.warn(f"h3moe: ignoring unreadable tuned config {path}: {err}")
        return None


_TUNED: dict[tuple, object] = {}  # (role, S_bucket, H, I, E, K, dtype, device_name) -> Config


def _from_json(role: str, key: tuple):
    _, sb, H, I, E, K, dt, dev = key
    table = _load_json(_json_name(E, H, I, dt, dev))
    if not table or role not in table:
        return None
    entries = table[role]  # {"K=2,S=4096": {...}} or {"4096": {...}}
    best, best_d = None, None
    for k, cfg in entries.items():
        parts = dict(p.split("=") for p in k.split(",")) if "=" in k else {"S": k}
        if "K" in parts and int(parts["K"]) != K:
            continue
        d = abs(int(parts["S"]).bit_length() - sb.bit_length())
        if best_d is None or d < best_d:
            best, best_d = cfg, d
    return None if best is None else _config_from_dict(best)


def _config_from_dict(d: dict):
    """A tuned file's entry: a Triton Config, or {"impl": "torch.grouped_mm"} (TORCH_GMM)."""
    return TORCH_GMM if d.get("impl") == "torch.grouped_mm" else _kernels().Config.from_dict(d)


_FILE_CFG: dict[tuple, object] = {}  # (config dir, key) -> Config from a JSON file, or None: one lookup per key


def _file_config(role: str, key: tuple):
    ck = (str(_CONFIG_DIR), key)
    if ck not in _FILE_CFG:
        _FILE_CFG[ck] = _from_json(role, key)
    return _FILE_CFG[ck]


def config_for(role: str, S: int, H: int, I: int, E: int, K: int, dtype: torch.dtype, device: torch.device,
               bench=None):
    """The config a launch of `role` uses (see the module docstring). `bench(cfg) -> ms` runs one candidate;
    given only where autotuning is allowed."""
    k = _kernels()
    fp32 = dtype == torch.float32
    arch = _arch(device)
    if device.type != "cuda":
        return k.default_config(role, S, E, K, fp32, arch)
    autotune = os.environ.get("H3MOE_AUTOTUNE", "1") != "0"
    key = (role, _s_bucket(S), H, I, E, K, _DTYPES[dtype], _device_name(device))
    if autotune:
        cfg = _TUNED.get(key)
        if cfg is not None:
            return cfg
    if os.environ.get("H3MOE_TUNED", "1") != "0":
        cfg = _file_config(role, key)
        if cfg is not None:
            return cfg
    if not autotune or bench is None or torch.cuda.is_current_stream_capturing():
        return k.default_config(role, S, E, K, fp32, arch)
    timings = []
    for c in _candidates(role, S, E, K, fp32, arch):
        try:
            timings.append((bench(c), c))
        except Exception as err:  # out of shared memory / registers on this GPU: skip the candidate
            if not _out_of_resources(err) and c != TORCH_GMM:  # (torch's op: any refusal of it is a skip)
                raise
    # the fastest; on a tie the earlier candidate (configs do not compare with TORCH_GMM)
    cfg = min(timings, key=lambda t: t[0])[1] if timings else k.default_config(role, S, E, K, fp32, arch)
    _TUNED[key] = cfg
    return cfg


def save_tuned(directory: str | os.PathLike | None = None) -> list[Path]:
    """Write the configs autotuned so far as JSON files (one per E, H, I, dtype, device), merged with what
    the files already hold. Default directory: h3moe/configs/. Returns the paths written."""
    out_dir = Path(directory) if directory is not None else _CONFIG_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, dict] = {}
    for (role, sb, H, I, E, K, dt, dev), cfg in sorted(_TUNED.items(), key=lambda kv: str(kv[0])):
        name = _json_name(E, H, I, dt, dev)
        if name not in files:
            path = out_dir / name
            files[name] = json.loads(path.read_text()) if path.is_file() else {}
        files[name].setdefault(role, {})[f"K={K},S={sb}"] = cfg.as_dict()
    paths = []
    for name, table in files.items():
        path = out_dir / name
        path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
        paths.append(path)
    _load_json_at.cache_clear()
    _FILE_CFG.clear()
    return paths


# ---------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------


def _prec(dtype: torch.dtype) -> str:
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _block_e(E: int) -> int:
    return max(2, 1 << (E - 1).bit_length())


def _m_slots(S: int, E: int, BM: int) -> int:
    # sum_e cdiv(count_e, BM) <= cdiv(S, BM) + E, and every tile has a row, so <= S as well
    return min(-(-S // BM) + E, S)


def _out_of_resources(err: Exception) -> bool:
    """Triton's OutOfResources (shared memory or registers beyond this GPU's), raised on the host when a
    compiled kernel is loaded, before anything is enqueued."""
    return "OutOfResources" in type(err).__name__ or "out of resource" in str(err).lower()


#: (role, S-bucket, H, I, E, K, dtype, device, config) -> the candidate that ran in its place on this GPU
_FITS: dict[tuple, object] = {}


def _launch(role, S, H, I, E, K, dtype, device, run):
    """Pick the config (benchmarking candidates where allowed) and launch `run(cfg)`. A config beyond this
    GPU's shared memory (the pinned defaults are sized for the A100's 164 KB and the H100's 228 KB; sm_86 / 89 /
    120 cards have ~100 KB per block) falls through to the next candidate that loads, once per key, said once."""
    bench = None
    if device.type == "cuda":
        def bench(cfg):
            from triton.testing import do_bench

            return do_bench(lambda: run(cfg), warmup=5, rep=20)
    cfg = config_for(role, S, H, I, E, K, dtype, device, bench)
    key = (role, _s_bucket(S), H, I, E, K, dtype, str(device), cfg)
    cfg = _FITS.get(key, cfg)
    try:
        run(cfg)
        return
    except Exception as err:  # noqa: BLE001 - only OutOfResources is handled, the rest re-raised
        if not _out_of_resources(err):
            raise
        first = err
    k = _kernels()
    fp32, arch = dtype == torch.float32, _arch(device)
    regime = _candidates(role, S, E, K, fp32, arch)
    # this regime's candidates first, then the role's other tiles (every tile computes the same result; the
    # decode tiles need the least shared memory)
    rest = [c for c in k.all_configs(role, fp32)
            if c not in regime and (arch >= 90 or not c.hopper_only) and not _tma_left_out(c)]
    for c in regime + sorted(rest, key=lambda c: (c.BM * c.BK + c.BK * c.BN) * c.num_stages, reverse=True):
        if c == cfg:
            continue
        try:
            run(c)
        except Exception as err:  # noqa: BLE001
            if not _out_of_resources(err):
                raise
            continue
        _FITS[key] = c
        warnings.warn(f"h3moe: the {role} config {cfg!r} does not fit this GPU ({first}); using {c!r} "
                      f"(tune this GPU: python -m h3moe.ops.triton_experts --E {E} --H {H} --I {I} --K {K})")
        return
    raise first


#: H3MOE_TMA's default. "0" until a GPU run has checked the descriptor kernels (tma_smoke(), the bench's
#: h3moe:triton-tma rows): autotuning is on by default, so "auto" would put them in every Hopper user's tuning.
_TMA_DEFAULT = "0"


def _tma_mode() -> str:
    mode = os.environ.get("H3MOE_TMA", _TMA_DEFAULT)
    if mode not in ("0", "1", "auto"):
        raise ValueError(f"H3MOE_TMA: expected 0, 1 or auto, got {mode!r}")
    return mode


class _TorchGroupedMM(tuple):
    """The weight-gradient roles' one candidate that is not a Triton config: torch's grouped matmul
    (torch.nn.functional.grouped_mm: CUTLASS on sm_90), dW = left_e^T @ right_e per expert. Where it cannot
    run (_wgrad_gmm_runs), the launch takes the role's pinned Triton config."""

    __slots__ = ()
    TMA = False
    hopper_only = True

    def __new__(cls):
        return super().__new__(cls, ("torch.grouped_mm",))

    def as_dict(self) -> dict:
        return {"impl": "torch.grouped_mm"}

    def __repr__(self) -> str:
        return "torch.grouped_mm"


TORCH_GMM = _TorchGroupedMM()


def _wgrad_gmm_mode() -> str:
    """H3MOE_WGRAD_GMM: auto (default): torch's grouped matmul is one more weight-gradient candidate the
    tuner times (large tiles, 16-bit, sm_90); 0: never; 1: every weight gradient where it runs."""
    mode = os.environ.get("H3MOE_WGRAD_GMM", "auto")
    if mode not in ("0", "1", "auto"):
        raise ValueError(f"H3MOE_WGRAD_GMM: expected 0, 1 or auto, got {mode!r}")
    return mode


def _wgrad_gmm_runs(left: torch.Tensor, right: torch.Tensor, E: int) -> bool:
    """grouped_mm for a weight gradient, where torch runs it as one CUTLASS kernel: bf16 (other dtypes take
    its per-expert fallback, which copies the offsets to the host: a sync, and an error inside a CUDA graph
    capture), fewer than 1024 experts (its group limit), 16-byte aligned, not while capturing, and on sm_90
    exactly (Blackwell's grouped_mm leaves garbage in the gradient of an expert with no row:
    pytorch/pytorch#172439; Hopper gives zeros). On CPU tensors (the interpreter's tests) fp16 and bf16."""
    from .experts import _use_torch_gmm

    if left.shape[0] == 0 or E >= 1024:
        return False
    if left.device.type == "cuda":
        if left.dtype != torch.bfloat16 or _arch(left.device) != 90 or torch.cuda.is_current_stream_capturing():
            return False
    elif left.dtype not in (torch.float16, torch.bfloat16):
        return False
    return _use_torch_gmm(left.t(), right)


def _wgrad_gmm(left: torch.Tensor, right: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """(E, M, N): left (S, M) and right (S, N) rows sorted by expert, offsets (E+1,) int32."""
    from .experts import _torch_grouped_mm

    return _torch_grouped_mm(left.t(), right, offsets[1:])


def _tma_left_out(cfg) -> bool:
    """A Tma candidate where H3MOE_TMA=0: it would only run as its pointer-load twin."""
    return cfg.TMA and _tma_mode() == "0"


def _candidates(role: str, S: int, E: int, K: int, fp32: bool, arch: int) -> list:
    """The role's candidates for this launch: the Triton configs, less the Tma ones where H3MOE_TMA=0 (they
    would run as their pointer-load twins), and for the weight gradients' large tiles on sm_90 (16-bit),
    torch's grouped matmul unless H3MOE_WGRAD_GMM=0."""
    k = _kernels()
    cands = [c for c in k.candidate_configs(role, S, E, K, fp32, arch) if not _tma_left_out(c)]
    if (role in ("wgrad_gu", "wgrad_down") and not fp32 and arch == 90 and k.regime(S, E, K) == "large"
            and _wgrad_gmm_mode() != "0"):
        cands = cands + [TORCH_GMM]
    return cands


@contextlib.contextmanager
def _environ(**values: str):
    """os.environ updated with `values` inside the block, and put back as it was after it."""
    old = {v: os.environ.get(v) for v in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for v, val in old.items():
            if val is None:
                os.environ.pop(v, None)
            else:
                os.environ[v] = val


_TMA_SMOKE: dict[int, str | None] = {}


def tma_smoke(timeout: float = 120.0) -> str | None:
    """Run the descriptor kernels once on this GPU, in a child process (a fault there cannot take this
    process's CUDA context with it): forward and backward at a decode and a large-tile shape with
    H3MOE_TMA=1 against H3MOE_TMA=0. None if they ran and agree, else why not. Cached per device."""
    import subprocess
    import sys

    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    index = torch.cuda.current_device()
    if index not in _TMA_SMOKE:
        if _arch_of(index) < 90:
            _TMA_SMOKE[index] = f"tensor descriptors need sm_90+, this GPU is sm_{_arch_of(index)}"
        else:
            code = "from h3moe.ops.triton_experts import _tma_smoke_child; _tma_smoke_child()"
            env = {**os.environ, "H3MOE_TMA_SMOKE_DEVICE": f"cuda:{index}"}
            try:
                p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                                   env=env)
                ok = p.returncode == 0 and p.stdout.strip().endswith("tma ok")
                why = None if ok else f"rc={p.returncode}: " + (p.stderr.strip() or p.stdout.strip())[-600:]
            except subprocess.TimeoutExpired:
                why = f"the smoke run took over {timeout:.0f}s"
            _TMA_SMOKE[index] = why
    return _TMA_SMOKE[index]


def _tma_smoke_child(shapes=((4, 256, 384, 8, 2), (512, 256, 384, 8, 2))) -> None:
    """tma_smoke()'s child (also run on CPU tensors under the interpreter by the tests): each (T, H, I, E, K)
    forward + backward in bf16 with and without descriptors, on the same random inputs; prints "tma ok".
    The default shapes compile the variants Mixtral-8x7B's decode and large tiles run (E=8, K=2, H and I
    multiples of 128), so Triton's cache holds them for the runs that follow."""
    from .routing import as_routing

    dev = torch.device(os.environ.get("H3MOE_TMA_SMOKE_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    with _environ(H3MOE_AUTOTUNE="0", H3MOE_TMA="0"):  # the pinned defaults: no timing of candidates
        for T, H, I, E, K in shapes:
            g = torch.Generator(device=dev).manual_seed(T)
            x = torch.randn(T, H, device=dev, generator=g)
            wgu = torch.randn(E, 2 * I, H, device=dev, generator=g) / H**0.5
            wd = torch.randn(E, H, I, device=dev, generator=g) / I**0.5
            logits = torch.randn(T, E, device=dev, generator=g)
            dy = torch.randn(T, H, device=dev, generator=g)
            outs = {}
            for mode in ("0", "1"):
                os.environ["H3MOE_TMA"] = mode
                leaves = [t.to(torch.bfloat16).requires_grad_() for t in (x, wgu, wd)]
                lg = logits.clone().requires_grad_()
                y = moe(*leaves, as_routing(torch.topk(torch.softmax(lg, -1), K, dim=-1), E))
                grads = torch.autograd.grad(y, (*leaves, lg), dy.to(y.dtype))
                outs[mode] = [t.float() for t in (y, *grads)]
            if dev.type == "cuda":
                torch.cuda.synchronize()
            for name, a, b in zip(("y", "dx", "dw_gate_up", "dw_down", "dlogits"), outs["0"], outs["1"]):
                err = (a - b).abs().max().item()
                if not (torch.isfinite(b).all() and err <= 1e-2 * max(a.abs().max().item(), 1e-3)):
                    raise SystemExit(f"T={T}: {name} differs by {err:.3g} with descriptors")
    print("tma ok")


def _scratch(size: int, alignment: int, stream):
    """Triton's global scratch (tensor descriptors made on the device), from torch's caching allocator on
    the current device and stream (inside a CUDA graph capture, its private pool)."""
    return torch.empty(size, device="cuda", dtype=torch.int8)


def _ensure_allocator() -> bool:
    """Set _scratch as Triton's allocator where none is set (per thread: Triton keeps it in a ContextVar,
    and autograd runs the backward in a thread of its own). A user's allocator is left alone. False where
    this Triton has no such allocator (then no descriptor is made on the device)."""
    try:
        import triton
        from triton.runtime import _allocation

        if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
            triton.set_allocator(_scratch)
    except (ImportError, AttributeError):
        return False
    return True


def _use_tma(cfg, tensors, row_elems) -> bool:
    """Whether a launch of `cfg` reads `tensors` through tensor descriptors: the config asks for it (or
    H3MOE_TMA=1), the dtype is 16-bit, the GPU is sm_90+ (or the interpreter runs), and every pointer and
    row stride (`row_elems`, in elements) is a multiple of 16 bytes, as TMA requires."""
    mode = _tma_mode()
    if not (cfg.TMA if mode == "auto" else mode == "1"):
        return False
    t0 = tensors[0]
    if t0.dtype not in (torch.float16, torch.bfloat16):
        return False
    if t0.device.type == "cuda":
        if _arch(t0.device) < 90:
            return False
    elif not _backend.interpreter_enabled():
        return False
    es = t0.element_size()
    if any(t.data_ptr() % 16 for t in tensors) or any(n * es % 16 for n in row_elems):
        return False
    return t0.device.type != "cuda" or _ensure_allocator()


def _check(x, w_gate_up, w_down):
    if x.dtype not in _DTYPES:
        raise NotImplementedError(
            f"the triton backend runs fp16, bf16 and fp32; got {x.dtype} (use backend='torch')")
    if w_gate_up.dtype != x.dtype or w_down.dtype != x.dtype:
        raise ValueError(f"w_gate_up/w_down: dtypes {w_gate_up.dtype}/{w_down.dtype} differ from x's {x.dtype}")
    if w_gate_up.device != x.device or w_down.device != x.device:
        raise ValueError(f"x, w_gate_up, w_down: on {x.device}, {w_gate_up.device}, {w_down.device}")


_COMBINE_MODES = ("fp32", "lowp", "atomic")


def _combine_mode() -> str:
    """H3MOE_COMBINE (module docstring); H3MOE_ATOMIC_COMBINE=1 is the older spelling of "atomic"."""
    if os.environ.get("H3MOE_ATOMIC_COMBINE", "0") == "1":
        return "atomic"
    mode = os.environ.get("H3MOE_COMBINE", "fp32")
    if mode not in _COMBINE_MODES:
        raise ValueError(f"H3MOE_COMBINE: expected one of {_COMBINE_MODES}, got {mode!r}")
    return mode


def _fwd(x, w_gate_up, w_down, rw, slots, offsets, activation: str, save_h: bool = False, limit=None):
    """y (T, H); with save_h, (y, h) where h (S, 2I) holds the gate/up pre-activation per sorted row.
    limit: the swiglu_limit (None: plain act(gate) * up)."""
    k = _kernels()
    T, H = x.shape
    E, I = w_down.shape[0], w_down.shape[2]
    G = w_gate_up.shape[1] // I if I else 2  # 2: [gate; up] rows; 1: ungated experts (the up rows alone)
    K = rw.shape[1]
    S = T * K
    interp = _backend.interpreter_enabled()
    h = torch.empty(S, G * I, device=x.device, dtype=x.dtype) if save_h else x.new_empty(0)
    if S == 0:
        return (x.new_zeros(T, H), h) if save_h else x.new_zeros(T, H)
    mode = _combine_mode()
    atomic = K > 1 and mode == "atomic"
    a = torch.empty(S, I, device=x.device, dtype=x.dtype)
    rw_flat = rw.reshape(-1)
    act_id = k.ACT_IDS[activation]

    def run_gate_up(cfg):
        m = _m_slots(S, E, cfg.BM)
        grid = (m * _cdiv(I, cfg.BN),)
        k._gate_up_kernel[grid](
            x, w_gate_up, slots, offsets, a, x, w_down, rw_flat, a, rw_flat, h if save_h else a, H, I, E, m,
            K=K, LIMIT=0.0 if limit is None else limit, ACT=act_id, HAS_LIMIT=limit is not None, GATED=G == 2,
            BWD=False, SAVE_H=save_h, RECOMPUTE=False, NEED_W=False, BM=cfg.BM, BN=cfg.BN,
            BK=cfg.BK, GROUP_M=cfg.GROUP_M, BLOCK_E=_block_e(E), EVEN_K=H % cfg.BK == 0,
            TMA=_use_tma(cfg, (w_gate_up,), (H,)), PREC=_prec(x.dtype), UPCAST=interp, INTERP=interp,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    _launch("gate_up", S, H, I, E, K, x.dtype, x.device, run_gate_up)

    if K == 1:
        out = torch.empty(T, H, device=x.device, dtype=x.dtype)  # slot == token: write y directly
    elif atomic:
        out = torch.zeros(T, H, device=x.device, dtype=torch.float32)
    else:
        out = torch.empty(S, H, device=x.device, dtype=x.dtype if mode == "lowp" else torch.float32)

    def run_down(cfg):
        m = _m_slots(S, E, cfg.BM)
        grid = (m * _cdiv(H, cfg.BN),)
        if atomic:
            out.zero_()
        k._down_kernel[grid](
            a, w_down, slots, offsets, rw_flat, out, H, I, E, m,
            K=K, TRANS_W=False, SCALE=True, ATOMIC=atomic, BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, GROUP_M=cfg.GROUP_M,
            BLOCK_E=_block_e(E), EVEN_K=I % cfg.BK == 0, TMA=_use_tma(cfg, (a, w_down), (I,)),
            PREC=_prec(x.dtype), UPCAST=interp, INTERP=interp, num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    _launch("down", S, H, I, E, K, x.dtype, x.device, run_down)
    if K == 1:
        y = out
    elif atomic:
        y = out.to(x.dtype)
    else:
        y = combine(out, T, K, x.dtype)
    return (y, h) if save_h else y


def _bwd(dy, x, w_gate_up, w_down, rw, slots, offsets, activation, need_x, need_gu, need_down, need_w, h=None,
         limit=None):
    """h: the forward's saved (S, 2I) pre-activation, or None to recompute it; limit: the swiglu_limit."""
    k = _kernels()
    T, H = x.shape
    E, I = w_down.shape[0], w_down.shape[2]
    G = w_gate_up.shape[1] // I if I else 2  # 2: [gate; up] rows; 1: ungated experts
    K = rw.shape[1]
    S = T * K
    interp = _backend.interpreter_enabled()
    dev, dt = x.device, x.dtype
    # The kernels write every element of these (an expert with no row gets zeros from _wgrad_kernel), so
    # they start empty: a memset of d(w_gate_up) alone would be 1.9 GB for Mixtral-8x7B.
    new = torch.zeros_like if S == 0 else torch.empty_like
    dx = new(x) if need_x else x.new_empty(0)
    # the weight gradients are allocated by their launch (torch's grouped_mm returns its own), or here
    dwgu = torch.zeros_like(w_gate_up) if need_gu and S == 0 else w_gate_up.new_empty(0)
    dwd = torch.zeros_like(w_down) if need_down and S == 0 else w_down.new_empty(0)
    drw = new(rw, dtype=torch.float32) if need_w else rw.new_empty(0, dtype=torch.float32)
    if S == 0 or not (need_x or need_gu or need_down or need_w):
        return dx, dwgu, dwd, drw
    prec = _prec(dt)
    rw_flat = rw.reshape(-1)
    act_id = k.ACT_IDS[activation]
    dh = torch.empty(S, G * I, device=dev, dtype=dt)
    a = torch.empty(S, I, device=dev, dtype=dt)
    part = {}

    saved = h is not None and h.numel() > 0
    slots64 = slots.long()  # (S,) flat slot of each sorted row, as an index

    def run_act(cfg):
        m = _m_slots(S, E, cfg.BM)
        nb = _cdiv(I, cfg.BN)
        # (S, NB) partial d(routing weight) per I block, only where the routing weights need a gradient
        part["dw"] = dwp = torch.empty(S, nb, device=dev, dtype=torch.float32) if need_w else rw_flat
        k._gate_up_kernel[(m * nb,)](
            x, w_gate_up, slots, offsets, a, dy, w_down, rw_flat, dh, dwp, h if saved else dh, H, I, E, m,
            K=K, LIMIT=0.0 if limit is None else limit, ACT=act_id, HAS_LIMIT=limit is not None, GATED=G == 2,
            BWD=True, SAVE_H=False, RECOMPUTE=not saved, NEED_W=need_w, BM=cfg.BM, BN=cfg.BN,
            BK=cfg.BK, GROUP_M=cfg.GROUP_M, BLOCK_E=_block_e(E), EVEN_K=H % cfg.BK == 0,
            TMA=_use_tma(cfg, (w_down, w_gate_up) if not saved else (w_down,), (H, I)), PREC=prec, UPCAST=interp,
            INTERP=interp, num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    _launch("bwd_act_saved" if saved else "bwd_act", S, H, I, E, K, dt, dev, run_act)
    if need_w:
        # row r's partial sums over the I blocks -> slot order (each slot written once: deterministic)
        drw.view(-1).index_copy_(0, slots64, part["dw"].sum(dim=1))

    if need_x:
        slot_dt = dt if _combine_mode() == "lowp" else torch.float32
        buf = torch.empty(S, H, device=dev, dtype=slot_dt) if K > 1 else dx

        def run_dx(cfg):
            m = _m_slots(S, E, cfg.BM)
            k._down_kernel[(m * _cdiv(H, cfg.BN),)](
                dh, w_gate_up, slots, offsets, rw_flat, buf, H, G * I, E, m,
                K=K, TRANS_W=True, SCALE=False, ATOMIC=False, BM=cfg.BM, BN=cfg.BN, BK=cfg.BK,
                GROUP_M=cfg.GROUP_M, BLOCK_E=_block_e(E), EVEN_K=(G * I) % cfg.BK == 0,
                TMA=_use_tma(cfg, (dh, w_gate_up), (G * I, H)), PREC=prec, UPCAST=interp, INTERP=interp,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)

        _launch("dx", S, H, I, E, K, dt, dev, run_dx)
        if K > 1:
            dx = combine(buf, T, K, dt)

    def wgrad(role, left, right, M, N):
        """(E, M, N) = per expert left_e^T @ right_e, by the role's config: _wgrad_kernel, or torch's grouped
        matmul (TORCH_GMM, H3MOE_WGRAD_GMM)."""
        out = {}

        def run(cfg):
            if (cfg == TORCH_GMM or _wgrad_gmm_mode() == "1") and _wgrad_gmm_runs(left, right, E):
                out["w"] = _wgrad_gmm(left, right, offsets)
                return
            if cfg == TORCH_GMM:  # where grouped_mm cannot run: the pinned Triton config
                cfg = k.default_config(role, S, E, K, dt == torch.float32, _arch(dev))
            if "w" not in out:  # (a grouped_mm result of an earlier candidate is as good a buffer)
                out["w"] = torch.empty(E, M, N, device=dev, dtype=dt)
            grid = (E * _cdiv(M, cfg.BM) * _cdiv(N, cfg.BN),)
            k._wgrad_kernel[grid](
                left, right, offsets, out["w"], M, N, BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, GROUP_M=cfg.GROUP_M,
                TMA=_use_tma(cfg, (left, right), (M, N)), PREC=prec, UPCAST=interp, INTERP=interp,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)

        _launch(role, S, H, I, E, K, dt, dev, run)
        return out["w"]

    # the weight gradients read both operands in sorted row order (see _wgrad_kernel): gathered here
    tok = slots64 // K if (need_gu or need_down) else None  # (S,) token of each sorted row
    if need_gu:  # d(w_gate_up)[e] = dH_e^T @ x[token]_e  (E, 2I, H)
        xs = x.index_select(0, tok)  # (S, H)
        dwgu = wgrad("wgrad_gu", dh, xs, G * I, H)
        del xs
    dh = None  # (S, 2I) no longer needed: freed before d(w_down)'s temporaries (the closures share this cell)
    if need_down:  # d(w_down)[e] = (w * dy[token])_e^T @ A_e  (E, H, I)
        dys = dy.index_select(0, tok)  # (S, H), scaled in place: fp32 product, one rounding
        dys.mul_(rw_flat.index_select(0, slots64).unsqueeze(1))
        dwd = wgrad("wgrad_down", dys, a, H, I)
    return dx, dwgu, dwd, drw


# ---------------------------------------------------------------------------------------------------
# Custom ops
# ---------------------------------------------------------------------------------------------------


@torch.library.custom_op("h3moe::triton_experts_fwd", mutates_args=(), device_types=("cuda", "cpu"))
def experts_fwd(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, weights: torch.Tensor,
                sorted_slots: torch.Tensor, offsets: torch.Tensor, activation: str,
                swiglu_limit: float | None = None) -> torch.Tensor:
    """Grouped SwiGLU experts (Triton).

    Args:
        x: (T, H) fp16/bf16/fp32. w_gate_up: (E, 2I, H), w_down: (E, H, I), x's dtype.
        weights: (T, K) fp32 routing weights. sorted_slots: (T*K,) int32. offsets: (E+1,) int32.
        activation: "silu" | "gelu" | "gelu_tanh" | "relu" | "relu2".
        swiglu_limit: None, or L > 0: act(min(gate, L)) * clamp(up, -L, L).
    Returns:
        y (T, H) in x's dtype.
    """
    return _fwd(x.contiguous(), w_gate_up.contiguous(), w_down.contiguous(), weights.float().contiguous(),
                sorted_slots.contiguous(), offsets.contiguous(), activation, limit=swiglu_limit)


@experts_fwd.register_fake
def _(x, w_gate_up, w_down, weights, sorted_slots, offsets, activation, swiglu_limit=None):
    return x.new_empty(x.shape)


@torch.library.custom_op("h3moe::triton_experts_fwd_saved", mutates_args=(), device_types=("cuda", "cpu"))
def experts_fwd_saved(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, weights: torch.Tensor,
                      sorted_slots: torch.Tensor, offsets: torch.Tensor, activation: str,
                      swiglu_limit: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """triton_experts_fwd for training: also returns h (T*K, 2I), the gate/up pre-activation of each sorted
    row in x's dtype, which the backward reads instead of recomputing the gate/up GEMM."""
    return _fwd(x.contiguous(), w_gate_up.contiguous(), w_down.contiguous(), weights.float().contiguous(),
                sorted_slots.contiguous(), offsets.contiguous(), activation, save_h=True, limit=swiglu_limit)


@experts_fwd_saved.register_fake
def _(x, w_gate_up, w_down, weights, sorted_slots, offsets, activation, swiglu_limit=None):
    return x.new_empty(x.shape), x.new_empty(weights.shape[0] * weights.shape[1], w_gate_up.shape[1])


@torch.library.custom_op("h3moe::triton_experts_bwd", mutates_args=(), device_types=("cuda", "cpu"))
def experts_bwd(dy: torch.Tensor, x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor,
                weights: torch.Tensor, sorted_slots: torch.Tensor, offsets: torch.Tensor, activation: str,
                need_x: bool, need_gate_up: bool, need_down: bool, need_weights: bool,
                h: torch.Tensor | None = None, swiglu_limit: float | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of triton_experts_fwd (h None: the gate/up pre-activation is recomputed) and of
    triton_experts_fwd_saved (h: its saved (T*K, 2I) output). Returns (dx (T, H), d w_gate_up (E, 2I, H),
    d w_down (E, H, I), d weights (T, K) fp32); a gradient not asked for is an empty (0,) tensor."""
    return _bwd(dy.contiguous(), x.contiguous(), w_gate_up.contiguous(), w_down.contiguous(),
                weights.float().contiguous(), sorted_slots.contiguous(), offsets.contiguous(), activation,
                need_x, need_gate_up, need_down, need_weights, None if h is None else h.contiguous(),
                swiglu_limit)


@experts_bwd.register_fake
def _(dy, x, w_gate_up, w_down, weights, sorted_slots, offsets, activation, need_x, need_gate_up, need_down,
      need_weights, h=None, swiglu_limit=None):
    def like(t, need, dtype=None):
        dtype = dtype or t.dtype
        return t.new_empty(t.shape, dtype=dtype) if need else t.new_empty(0, dtype=dtype)

    return (like(x, need_x), like(w_gate_up, need_gate_up), like(w_down, need_down),
            like(weights, need_weights, torch.float32))


def _setup_context(ctx, inputs, output):
    x, w_gate_up, w_down, weights, sorted_slots, offsets, activation, *limit = inputs
    ctx.save_for_backward(x, w_gate_up, w_down, weights, sorted_slots, offsets)
    ctx.activation, ctx.limit = activation, (limit or [None])[0]


def _setup_context_saved(ctx, inputs, output):
    x, w_gate_up, w_down, weights, sorted_slots, offsets, activation, *limit = inputs
    ctx.save_for_backward(x, w_gate_up, w_down, weights, sorted_slots, offsets, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.activation, ctx.limit = activation, (limit or [None])[0]


def _grads(ctx, dy, saved):
    """saved: ctx.saved_tensors, read ONCE by the caller (a second read raises under non-reentrant activation
    checkpointing, whose unpack hooks recompute on the first read); its 7th tensor, when there, is the saved
    pre-activation h (else the backward recomputes it)."""
    x, w_gate_up, w_down, weights, sorted_slots, offsets = saved[:6]
    h = saved[6] if len(saved) > 6 else None
    nx, ngu, nd, nw = ctx.needs_input_grad[:4]
    dx, dgu, dd, dw = experts_bwd(dy, x, w_gate_up, w_down, weights, sorted_slots, offsets, ctx.activation,
                                  nx, ngu, nd, nw, h, ctx.limit)
    return (dx if nx else None, dgu if ngu else None, dd if nd else None,
            dw.to(weights.dtype) if nw else None, None, None, None, None)


def _backward(ctx, dy):
    return _grads(ctx, dy, ctx.saved_tensors)


def _backward_saved(ctx, dy, _dh):
    return _grads(ctx, dy, ctx.saved_tensors)


def _bwd_backward(ctx, *grads):
    raise NotImplementedError("h3moe::triton_experts_bwd: double backward is not supported")


experts_fwd.register_autograd(_backward, setup_context=_setup_context)
experts_fwd_saved.register_autograd(_backward_saved, setup_context=_setup_context_saved)
experts_bwd.register_autograd(_bwd_backward, setup_context=lambda ctx, inputs, output: None)


def _recompute_default() -> bool:
    return os.environ.get("H3MOE_RECOMPUTE", "0") == "1"


def _limit_in(limit: float | None, dtype: torch.dtype) -> float | None:
    """A (validated) swiglu_limit rounded to the activations' dtype: eager's torch.clamp(h, max=L) on bf16/fp16
    h clamps at (and passes the gradient up to) L in h's dtype, so the kernels compare against that value."""
    return None if limit is None else float(torch.tensor(limit, dtype=dtype))


_limit_in._dynamo_marked_constant = True  # (torch.compile: evaluated at trace time, a constant of the graph)


def moe(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, routing: Routing,
        activation: str = "silu", recompute: bool | None = None, swiglu_limit: float | None = None) -> torch.Tensor:
    """SwiGLU experts with the Triton kernels (swiglu_limit: h3moe.moe's; w_gate_up (E, I, H): ungated experts,
    act(x @ Wup^T), h3moe.moe's gated=False). x (T, H), w_gate_up (E, 2I, H), w_down (E, H, I) in one dtype
    (fp16, bf16 or fp32); routing from h3moe.route. Returns (T, H) in x's dtype, differentiable w.r.t. x,
    both weights and routing.weights.

    When autograd will need a gradient, the forward keeps the (T*K, 2I) gate/up pre-activation for the
    backward (as eager autograd would, in x's dtype). recompute=True (default: H3MOE_RECOMPUTE=1) keeps only
    the inputs and recomputes it in the backward instead: 2*T*K*I elements less memory per layer (470 MB in
    bf16 for Mixtral-8x7B at 4096 tokens) for 4*T*K*H*I more FLOPs (+33% on the backward)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {sorted(ACTIVATIONS)}, got {activation!r}")
    _check(x, w_gate_up, w_down)
    I = w_down.shape[2]  # (comparisons only: they trace with symbolic sizes under torch.compile(dynamic=True))
    if w_gate_up.shape[1] != 2 * I and w_gate_up.shape[1] != I:
        raise ValueError(f"w_gate_up: expected (E, 2I, H) or, ungated, (E, I, H) with I={I}; got "
                         f"{tuple(w_gate_up.shape)}")
    gated = I == 0 or w_gate_up.shape[1] == 2 * I
    swiglu_limit = _limit_in(_validate.swiglu_limit(swiglu_limit, gated), x.dtype)
    if w_down.shape[0] > 4096:
        raise NotImplementedError(f"the triton experts kernels take E <= 4096 experts; got {w_down.shape[0]}")
    if w_gate_up.shape[1] * x.shape[1] >= 2**31:  # offsets inside one expert's weights are int32 in the kernels
        raise NotImplementedError(f"the triton experts kernels take 2*I*H (ungated I*H) < 2**31 elements per "
                                  f"expert; got I={w_down.shape[2]}, H={x.shape[1]} (use backend='torch')")
    args = (x, w_gate_up, w_down, routing.weights, routing.sorted_slots, routing.offsets, activation, swiglu_limit)
    with _backend.device_guard(x):  # x's GPU, where it is not the current device (device_map="auto")
        if _backend.eager_direct(x, w_gate_up, w_down, routing.weights):  # inference: skip the dispatcher
            return _fwd(x.contiguous(), w_gate_up.contiguous(), w_down.contiguous(),
                        routing.weights.float().contiguous(), routing.sorted_slots.contiguous(),
                        routing.offsets.contiguous(), activation, limit=swiglu_limit)
        if recompute is None:
            recompute = _recompute_default()
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, w_gate_up, w_down, routing.weights))
        if grad and not recompute:
            return experts_fwd_saved(*args)[0]
        return experts_fwd(*args)


_backend.register_ops("triton", "moe")


def tune(E: int, H: int, I: int, K: int, dtype: torch.dtype = torch.bfloat16, tokens=(1, 4, 16, 64, 256, 1024, 4096),
         backward: bool = True, directory=None) -> list[Path]:
    """Autotune every kernel role at each token count (fresh random inputs on the current GPU) and write the
    winners to h3moe/configs/ (or `directory`). Run it once per GPU type and model shape."""
    if not torch.cuda.is_available():
        raise RuntimeError("tune() needs a CUDA GPU")
    os.environ["H3MOE_AUTOTUNE"] = "1"
    wgu, wd = _random_weights(E, H, I, dtype, torch.device("cuda"), backward)
    for T in tokens:
        _random_call(wgu, wd, T, K, backward)
        torch.cuda.synchronize()
    return save_tuned(directory)


def _random_weights(E: int, H: int, I: int, dtype: torch.dtype, device: torch.device, grad: bool):
    wgu = (torch.randn(E, 2 * I, H, device=device) / H**0.5).to(dtype).requires_grad_(grad)
    wd = (torch.randn(E, H, I, device=device) / I**0.5).to(dtype).requires_grad_(grad)
    return wgu, wd


def _random_call(wgu: torch.Tensor, wd: torch.Tensor, T: int, K: int, backward: bool) -> None:
    """One moe() call on fresh random tokens and top-K routing (and its backward): every role launches."""
    from .routing import as_routing

    E, H = wd.shape[0], wd.shape[1]
    x = torch.randn(T, H, device=wd.device, dtype=wd.dtype, requires_grad=backward)
    logits = torch.randn(T, E, device=wd.device)
    y = moe(x, wgu, wd, as_routing(torch.topk(torch.softmax(logits, -1), K, dim=-1), E))
    if backward:
        y.backward(torch.randn_like(y))


#: Kernel roles a tune() run launches (the saved-h backward; bwd_act only runs with H3MOE_RECOMPUTE=1).
_TUNE_ROLES = ("gate_up", "down", "bwd_act_saved", "dx", "wgrad_gu", "wgrad_down")


def _precompile_work(E: int, K: int, tokens, backward: bool = True, fp32: bool = False, arch: int = 90):
    """(role, config, T) for every candidate a tune() at these token counts can time, each once, with a T
    of its regime."""
    roles = _TUNE_ROLES if backward else _TUNE_ROLES[:2]
    work, seen = [], set()
    for T in tokens:
        for role in roles:
            for cfg in _candidates(role, T * K, E, K, fp32, arch):
                if cfg != TORCH_GMM and (role, cfg) not in seen:  # (torch's op: nothing to compile)
                    seen.add((role, cfg))
                    work.append((role, cfg, T))
    return work


def _precompile_run(E: int, H: int, I: int, K: int, dtype: torch.dtype, work, backward: bool = True) -> list:
    """Launch each (role, config, T) of `work` once: a forward (and backward) at T tokens with that config
    forced on its role and the pinned defaults elsewhere. Returns the (role, config) pairs launched."""
    import h3moe.ops.triton_experts as te  # the module itself: its config_for is what _launch calls

    dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    launched = []
    real = te.config_for
    forced = {}

    def config_for(role, *args, **kwargs):
        if role in forced:
            launched.append((role, forced[role]))
            return forced[role]
        return real(role, *args, **kwargs)

    te.config_for = config_for
    try:
        with _environ(H3MOE_AUTOTUNE="0", H3MOE_TUNED="0"):
            wgu, wd = _random_weights(E, H, I, dtype, dev, backward)
            for role, cfg, T in work:
                forced.clear()
                forced[role] = cfg
                _random_call(wgu, wd, T, K, backward)
            if dev.type == "cuda":
                torch.cuda.synchronize()
    finally:
        te.config_for = real
    return launched


def _precompile_child(spec: str) -> None:
    """A precompile() child process: `spec` is the JSON of its share of the work."""
    d = json.loads(spec)
    work = [(r, _config_from_dict(c), T) for r, c, T in d["work"]]
    dtype = {v: t for t, v in _DTYPES.items()}[d["dtype"]]
    print(len(_precompile_run(d["E"], d["H"], d["I"], d["K"], dtype, work, d["backward"])))


def precompile(E: int, H: int, I: int, K: int, dtype: torch.dtype = torch.bfloat16, tokens=(1, 16, 4096),
               backward: bool = True, jobs: int = 8) -> int:
    """Compile every kernel variant a tune() of this shape will time, in `jobs` processes at once, into
    Triton's on-disk cache (which the tuning process then reads instead of compiling one variant after the
    other). The children run a small stand-in shape, H' = 128 + H % 128 and I' = 128 + I % 128: the same
    E, K and row regimes, and the same specializations (every K-tail flag, divisibility by 16, 16-byte row
    alignment), so the same variants, at a few microseconds of GPU time each. Returns the launches run."""
    import subprocess
    import sys

    if not torch.cuda.is_available():
        raise RuntimeError("precompile() needs a CUDA GPU")
    arch = _arch(torch.device("cuda"))
    work = _precompile_work(E, K, tokens, backward, dtype == torch.float32, arch)
    Hs, Is = 128 + H % 128, 128 + I % 128
    chunks = [c for c in (work[i::max(1, jobs)] for i in range(max(1, jobs))) if c]
    # plain child interpreters (not multiprocessing: its spawn re-runs a `python -m` main module, which
    # would register this module's custom ops twice)
    code = "import sys; from h3moe.ops.triton_experts import _precompile_child; _precompile_child(sys.argv[1])"
    procs = []
    for c in chunks:
        spec = json.dumps({"E": E, "H": Hs, "I": Is, "K": K, "dtype": _DTYPES[dtype], "backward": backward,
                           "work": [(r, cfg.as_dict(), T) for r, cfg, T in c]})
        procs.append(subprocess.Popen([sys.executable, "-c", code, spec], stdout=subprocess.PIPE, text=True))
    done = 0
    for p in procs:
        out, _ = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"precompile: a child failed (rc={p.returncode})")
        done += int(out.strip().splitlines()[-1])
    return done


def _main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m h3moe.ops.triton_experts",
                                 description="Autotune the Triton expert kernels for one model shape on this GPU "
                                             "and save the configs as JSON in h3moe/configs/.")
    ap.add_argument("--E", type=int, required=True)
    ap.add_argument("--H", type=int, required=True)
    ap.add_argument("--I", type=int, required=True)
    ap.add_argument("--K", type=int, required=True)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--tokens", default="1,4,16,64,256,1024,4096", help="comma-separated token counts T")
    ap.add_argument("--no-backward", action="store_true")
    ap.add_argument("--out", default=None, help="directory (default: h3moe/configs/)")
    ap.add_argument("--precompile-jobs", type=int, default=0,
                    help="first compile every candidate in N processes at once (precompile()); 0: no")
    a = ap.parse_args(argv)
    dtype = {v: k for k, v in _DTYPES.items()}[a.dtype]
    tokens = [int(t) for t in a.tokens.split(",")]
    if a.precompile_jobs > 0:
        import time

        t0 = time.perf_counter()
        n = precompile(a.E, a.H, a.I, a.K, dtype, tokens, not a.no_backward, a.precompile_jobs)
        print(f"precompiled: {n} launches in {time.perf_counter() - t0:.1f}s ({a.precompile_jobs} processes)")
    paths = tune(a.E, a.H, a.I, a.K, dtype, tokens, not a.no_backward, a.out)
    for p in paths:
        print(p)

