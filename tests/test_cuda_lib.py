"""csrc/ C-ABI library, CPU tier: the build CI made (sm_80 + sm_90a), its exports, argument checks that
return before any CUDA call, the SASS of its kernels, and the fakes of the h3moe::cuda_* custom ops.

Needs no GPU. Skipped where the library cannot have been built (no nvcc/cmake, or H3MOE_CUDA=0);
where nvcc is on the PATH, `pip install -e .` must have built it, and these tests fail if it did not.
"""
import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import h3moe
from h3moe import _lib

ROOT = Path(__file__).resolve().parents[1]
CAN_BUILD = os.environ.get("H3MOE_CUDA", "1") != "0" and shutil.which("cmake") and (
    shutil.which("nvcc") or Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc").exists())
pytestmark = pytest.mark.skipif(not CAN_BUILD, reason="no nvcc/cmake here (or H3MOE_CUDA=0): csrc/ not built")

# h3moe.h error codes
EINVAL, EDTYPE, ELIMIT, EALIGN, EWORKSPACE = -1, -2, -3, -4, -5


def _lib_path() -> Path:
    for p in _lib.candidates():
        if p.exists():
            return p
    pytest.fail("libh3moe_cuda.so was not built although nvcc is here: `pip install -e .` should build it "
                "(setup.py BuildPy, editable_mode) into h3moe/lib/")


def _tool(name: str) -> str:
    import triton  # the wheel ships cuobjdump / nvdisasm (../shared/NOTES.md)

    for p in (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name,
              Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / name):
        if p.exists():
            return str(p)
    found = shutil.which(name)
    if not found:
        pytest.skip(f"{name} not found")
    return found


@pytest.fixture(scope="module")
def lib():
    _lib_path()
    lib = _lib.load()
    assert lib is not None, "libh3moe_cuda.so exists but ctypes cannot load it"
    return lib


def test_every_entry_point_is_exported():
    out = subprocess.run(["nm", "-D", "--defined-only", str(_lib_path())], capture_output=True, text=True,
                         check=True).stdout
    exported = {line.split()[-1] for line in out.splitlines() if line.split()[-1].startswith("h3moe_")}
    assert exported == set(_lib.SIGNATURES), f"h3moe.h and _lib.SIGNATURES disagree: {exported ^ set(_lib.SIGNATURES)}"
    # hidden visibility: no C++ kernel symbols leak into the dynamic table
    assert not [line for line in out.splitlines() if "h3moe" in line and "_Z" in line]


def test_version_and_build_info(lib):
    assert lib.h3moe_version().decode() == h3moe.__version__
    info = lib.h3moe_build_info().decode()
    archs = os.environ.get("H3MOE_CUDA_ARCHS", "80;90a").replace(";", ",")
    assert f"archs={archs}" in info
    ok, desc = _lib.status()
    assert ok and h3moe.__version__ in desc and "archs=" in desc
    assert "archs=" in h3moe.backends()["cuda"].reason  # h3moe.backends() reports the build


def test_limits_match_python(lib):
    from h3moe.ops import cuda

    assert lib.h3moe_route_max_experts() == cuda.MAX_EXPERTS == 256
    assert lib.h3moe_route_max_topk() == cuda.MAX_TOPK == 8
    assert lib.h3moe_sort_max_experts() == 1024


@pytest.mark.parametrize("S,E,want", [
    (0, 8, 0),  # no rows: no chunk
    (1, 8, 32),  # one partial chunk of 1024 rows: E int32 counters
    (1024, 3, 12),  # exactly one chunk
    (1025, 3, 24),  # one row over: two chunks
])
def test_sort_workspace_bytes(lib, S, E, want):
    assert lib.h3moe_sort_workspace_bytes(S, E) == want


def test_error_strings(lib):
    msgs = {c: _lib.error_string(c) for c in (0, EINVAL, EDTYPE, ELIMIT, EALIGN, EWORKSPACE, -99)}
    assert msgs[0] == "ok"
    assert len(set(msgs.values())) == len(msgs)  # each code its own message
    assert _lib.error_string(1) == "invalid argument"  # positive codes are cudaError_t (1 = cudaErrorInvalidValue)


NULL = None


def _route_fwd(lib, T=4, E=8, K=2, dtype=2, sample_len=1, psum=NULL, weights=0x1000, ids=0x2000):
    # Invalid arguments are rejected before any pointer is touched or any CUDA call is made.
    return lib.h3moe_route_fwd(0x100, dtype, T, E, K, 1, weights, ids, sample_len, NULL, psum, NULL, NULL,
                               NULL, NULL, 0, NULL)


def test_route_fwd_rejects_bad_arguments(lib):
    assert _route_fwd(lib, E=0) == EINVAL  # no experts
    assert _route_fwd(lib, K=9, E=8) == EINVAL  # K > E
    assert _route_fwd(lib, E=300) == ELIMIT  # E > 256: Python falls back
    assert _route_fwd(lib, E=64, K=9) == ELIMIT  # K > 8
    assert _route_fwd(lib, dtype=7) == EDTYPE  # unknown dtype code
    assert _route_fwd(lib, K=0) == EINVAL  # K = 0 without psum: nothing to compute
    assert _route_fwd(lib, K=0, T=6, sample_len=4, psum=0x3000) == EINVAL  # sample_len does not divide T
    assert _route_fwd(lib, weights=NULL) == EINVAL  # K > 0 needs the outputs
    assert lib.h3moe_route_bwd(0x100, 2, 4, 8, 2, 1, NULL, 0x1000, 1, NULL, NULL, 0x200, NULL) == EINVAL  # no ids


def test_sort_rejects_bad_arguments(lib):
    assert lib.h3moe_sort_by_expert(0x100, 10, 2000, 0x1, 0x2, 0x3, 0x4, 1 << 20, NULL) == ELIMIT  # E > 1024
    assert lib.h3moe_sort_by_expert(0x100, 10, 8, 0x1, 0x2, 0x3, 0x4, 4, NULL) == EWORKSPACE  # 4 < 32 bytes
    assert lib.h3moe_sort_by_expert(0x100, 10, 8, NULL, 0x2, 0x3, 0x4, 64, NULL) == EINVAL  # no counts


def _moe_fwd(lib, H=64, I=32, dtype=2, x=0x1000, act=0, ws_bytes=1 << 30):
    return lib.h3moe_moe_fwd(x, dtype, 4, H, I, 8, 2, 0x2000, 0x3000, 0x4000, 0x5000, 0x6000, act, 0, 0x7000,
                             ws_bytes, 0x9000, NULL)


def test_moe_fwd_rejects_bad_arguments(lib):
    assert _moe_fwd(lib, H=68) == EALIGN  # H % 8 != 0
    assert _moe_fwd(lib, I=36) == EALIGN  # I % 8 != 0
    assert _moe_fwd(lib, x=0x1008) == EALIGN  # x not 16-byte aligned
    assert _moe_fwd(lib, act=9) == EINVAL  # unknown activation
    assert _moe_fwd(lib, dtype=0) == EDTYPE  # fp32: no tensor-core path
    assert _moe_fwd(lib, ws_bytes=64) == EWORKSPACE  # workspace smaller than h3moe_moe_workspace_bytes


@pytest.mark.parametrize("T,H,I,E,K,split_k,want", [
    # act (S, I) bf16 + [s1 > 1: (s1, S, 2I) fp32] + (s2, S, H) fp32, each rounded up to 256 bytes
    (1, 4096, 14336, 8, 2, 0, 2 * 14336 * 2 + 5 * 2 * 2 * 14336 * 4 + 16 * 2 * 4096 * 4),  # Mixtral decode
    (4096, 4096, 14336, 8, 2, 0, 8192 * 14336 * 2 + 8192 * 4096 * 4),  # prefill: no split
    (3, 64, 40, 4, 1, 3, 256 + 2048 + 1536),  # forced 3 splits, capped at the 2 k steps of H and of I
    (3, 64, 40, 4, 1, 1, 256 + 768),  # forced 1: no partial buffer
])
def test_moe_workspace_bytes(lib, T, H, I, E, K, split_k, want):
    assert lib.h3moe_moe_workspace_bytes(2, T, H, I, E, K, split_k) == want
    assert lib.h3moe_moe_workspace_bytes(0, T, H, I, E, K, split_k) == 0  # fp32: unsupported


def test_call_raises_with_message(lib):
    with pytest.raises(_lib.CudaLibError, match="h3moe_moe_fwd failed: .*aligned"):
        _lib.call("h3moe_moe_fwd", 0x1000, 2, 4, 68, 32, 8, 2, 0x2000, 0x3000, 0x4000, 0x5000, 0x6000, 0, 0,
                  0x7000, 1 << 30, 0x9000, None)


def test_cubins_for_sm80_and_sm90a_use_tensor_cores_without_spills(tmp_path):
    so = str(_lib_path())
    cuobjdump = _tool("cuobjdump")
    elf = subprocess.run([cuobjdump, "-elf", so], capture_output=True, text=True).stdout
    archs = set(line.split("=")[1].strip() for line in elf.splitlines() if line.strip().startswith("arch ="))
    assert {"sm_80", "sm_90a"} <= archs, archs
    subprocess.run([cuobjdump, "-xelf", "all", so], cwd=tmp_path, capture_output=True, check=True)
    cubins = sorted(tmp_path.glob("experts.sm_*.cubin"))
    assert len(cubins) == 2, cubins
    sass = "".join(subprocess.run([cuobjdump, "-sass", str(c)], capture_output=True, text=True).stdout
                   for c in cubins)
    # every expert GEMM kernel, for both architectures, runs on tensor cores (mma.sync → HMMA.16816)
    blocks = sass.split("Function : ")
    gemm = [b for b in blocks if "gate_up_kernel" in b.split("\n")[0] or "down_kernel" in b.split("\n")[0]]
    assert len(gemm) == 2 * (2 * 4 * 2 + 2 * 2)  # 2 archs × (dtype × activation × MT gate_up + dtype × MT down)
    assert "splitk_act_kernel" in sass
    assert all("HMMA.16816.F32" in b for b in gemm)
    usage = subprocess.run([cuobjdump, "--dump-resource-usage", so], capture_output=True, text=True).stdout
    lines = usage.splitlines()
    spills = [lines[i - 1] for i, line in enumerate(lines) if "LOCAL:" in line and "LOCAL:0 " not in line]
    # the only allowed spill: route_bwd<EPL=1>'s 8 bytes around the IEEE-division slow path (not a GEMM)
    assert all("route_bwd_kernel" in f or "div_rn" in f for f in spills), spills


def test_fakes_give_shapes_without_running():
    from h3moe.ops import cuda  # noqa: F401  (registers the ops)

    T, E, K, B, H, I = 12, 16, 3, 4, 32, 24
    logits = torch.empty(T, E, device="meta", dtype=torch.bfloat16)
    w, ids, counts, offsets, sorted_slots, psum = torch.ops.h3moe.cuda_route_fwd(logits, K, True, B, None)
    assert (w.shape, w.dtype, ids.shape, ids.dtype) == ((T, K), torch.float32, (T, K), torch.int64)
    assert (counts.shape, offsets.shape, sorted_slots.shape, psum.shape) == ((E,), (E + 1,), (T * K,), (B, E))
    d = torch.ops.h3moe.cuda_route_bwd(logits, ids, w, psum, None, B, True)
    assert d.shape == logits.shape and d.dtype == logits.dtype
    x = torch.empty(T, H, device="meta", dtype=torch.bfloat16)
    y = torch.ops.h3moe.cuda_moe_fwd(x, torch.empty(E, 2 * I, H, device="meta", dtype=torch.bfloat16),
                                     torch.empty(E, H, I, device="meta", dtype=torch.bfloat16), w, offsets,
                                     sorted_slots, "silu")
    assert y.shape == (T, H) and y.dtype == torch.bfloat16


def test_cpu_tensors_are_not_supported_and_say_why():
    from h3moe.ops import cuda

    ok, why = cuda.supports("route", torch.randn(4, 8), top_k=2)
    assert not ok and ("CUDA" in why or "built" in why)
    with pytest.raises(h3moe.BackendUnavailable, match="cuda"):  # CPU tensors, GPU or not
        h3moe.moe(torch.randn(4, 8), torch.randn(2, 8, 8), torch.randn(2, 8, 4),
                  h3moe.route(torch.randn(4, 2), 1), backend="cuda")


def test_library_loads_without_libcudart():
    # Static cudart: a CPU-only torch (no libcudart.so in the process) can still load it.
    out = subprocess.run(["ldd", str(_lib_path())], capture_output=True, text=True).stdout
    assert "libcudart" not in out
    ctypes.CDLL(str(_lib_path()))
