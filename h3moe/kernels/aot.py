"""Ahead-of-time compile specs for the compile tier (no GPU needed).

Every Triton kernel module in h3moe/kernels/ exposes `aot_specs() -> list[AotSpec]`: one spec per kernel,
dtype and autotune configuration it can pick at run time. The compile tier (tests/test_compile_tier.py,
scripts/kernel_report.py) compiles each for sm_80 and sm_90 with `triton.compile(ASTSource(...),
target=GPUTarget("cuda", arch, 32))` and reads registers, shared memory and spills with the cuobjdump that
ships in the Triton wheel. Must run with TRITON_INTERPRET unset (the interpreter replaces @triton.jit):
`main()` re-runs itself in a child process without it.

    python -m h3moe.kernels.aot [--json] [--sass] [--arch 90] [--filter NAME] [--max-per-kernel N]

Checks (tests/test_compile_tier.py): every kernel function compiles for sm_80 and sm_90; spills (cuobjdump
STACK + LOCAL, bytes per thread) stay within `AotSpec.max_local_bytes` (0 unless a spec records and bounds
them); `gemm=True` specs use wgmma on sm_90 and mma.sync on sm_80. CI compiles `--max-per-kernel 4` specs per
kernel function (evenly spaced over each module's list) to stay within its time budget.
"""
from __future__ import annotations

from dataclasses import dataclass, field

#: Modules whose aot_specs() the compile tier collects.
KERNEL_MODULES = (
    "h3moe.kernels.routing",
    "h3moe.kernels.gating_loss",
    "h3moe.kernels.experts",
    "h3moe.kernels.quant",
    "h3moe.kernels.combine",
)


@dataclass(frozen=True)
class AotSpec:
    name: str  # unique, readable: "experts_gate_up[bf16,BM=64,BN=128,BK=64,w4,s3]"
    fn: object  # the @triton.jit function
    signature: dict  # argument name -> "*bf16" / "*fp32" / "*i32" / "i32" / "fp32" / "constexpr"
    constexprs: dict = field(default_factory=dict)  # constexpr name -> value
    num_warps: int = 4
    num_stages: int = 3
    gemm: bool = False  # a tensor-core GEMM: must use wgmma on sm_90 (mma.sync on sm_80)
    archs: tuple = (80, 90)
    max_local_bytes: int = 0  # spill bound (cuobjdump STACK + LOCAL, bytes per thread) the compile tier enforces
    # Argument names compiled as multiples of 16 (tt.divisibility), as Triton's JIT specializes 16-byte aligned
    # pointers and ints divisible by 16 at run time: without them the compile shows scalar, unpipelined loads.
    divisible: tuple = ()
    # Loads through tensor descriptors (TMA): sm_90 only, and its PTX must hold cp.async.bulk.tensor. The
    # CI sample takes one of these per kernel function on top of its max_per_kernel others.
    tma: bool = False


# ----------------------------------------------------------------------------------------------------------
# The compiler side: used by tests/test_compile_tier.py and scripts/kernel_report.py. Triton is imported
# inside the functions only (h3moe never imports triton at package import time).

#: SASS opcodes the report counts: tensor-core MMAs (Hopper HGMMA, Ampere HMMA), spill traffic (LDL/STL),
#: shared and global memory traffic, barriers.
SASS_OPS = ("HGMMA", "HMMA", "LDL", "STL", "LDS", "STS", "LDSM", "LDG", "STG", "LDGSTS", "UTMALDG", "BAR")


def collect_specs(modules=KERNEL_MODULES) -> list[tuple[str, AotSpec]]:
    """(module name, spec) for every module in `modules` that exists and defines aot_specs(); a module that
    exists but fails to import raises (a broken kernel file must fail the compile tier, not skip it)."""
    import importlib
    import importlib.util

    out = []
    for mod in modules:
        if importlib.util.find_spec(mod) is None:
            continue
        m = importlib.import_module(mod)
        fn = getattr(m, "aot_specs", None)
        if fn is None:
            continue
        out.extend((mod, s) for s in fn())
    return out


def _bin_dir() -> str:
    import os

    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def resource_usage(cubin: bytes) -> dict:
    """REG / STACK / SHARED / LOCAL (spills, bytes per thread) from `cuobjdump --dump-resource-usage`."""
    import os
    import re
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        text = subprocess.run(
            [os.path.join(_bin_dir(), "cuobjdump"), "--dump-resource-usage", path],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
    usage = {}
    for key in ("REG", "STACK", "SHARED", "LOCAL"):
        m = re.search(rf"\b{key}:(\d+)", text)
        usage[key.lower()] = int(m.group(1)) if m else None
    return usage


def sass_histogram(cubin: bytes) -> dict:
    """Counts of the SASS_OPS opcodes (by base name, predicates and modifiers stripped), via nvdisasm."""
    import collections
    import os
    import re
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        text = subprocess.run(
            [os.path.join(_bin_dir(), "nvdisasm"), "-c", path], capture_output=True, text=True, check=True
        ).stdout
    op_re = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9]*)")
    ops = collections.Counter()
    for m in op_re.finditer(text):
        ops[m.group(1)] += 1
    return {op: ops.get(op, 0) for op in SASS_OPS} | {"total": sum(ops.values()), "loop": _main_loop(text, op_re)}


def _main_loop(text: str, op_re) -> int:
    """Instructions in the kernel's longest loop body: from a label to the last branch back to it, predicated
    (sm_90 ptxas tests at the bottom) or not (sm_80 often tests at the top and jumps back unconditionally): the K
    loop of a GEMM or GEMV; 0 when there is none (the one-instruction `BRA` to itself after EXIT is not a loop,
    nor is a branch back over an EXIT: ptxas puts the divergence slow paths of shuffles (BRA.DIV targets) after
    the kernel's end and jumps back into the loop from there). A slow path that ptxas places inside the loop's
    address range is counted: an upper bound on one iteration's instructions."""
    import re

    lines = text.splitlines()
    labels = {}
    for i, line in enumerate(lines):
        m = re.match(r"^\s*(\.L_x_\d+):", line)
        if m:
            labels[m.group(1)] = i
    exits = [i for i, line in enumerate(lines) if re.search(r"\bEXIT\b", line)]
    best = (0, 0)
    for i, line in enumerate(lines):
        m = re.search(r"(?:@!?P\d+\s+)?\bBRA\s+`\((\.L_x_\d+)\)", line)
        if not m or m.group(1) not in labels:
            continue
        j = labels[m.group(1)]
        # a back edge spanning an EXIT is a slow path placed after the kernel's end jumping back into the loop
        # (ptxas' divergence fallback for shuffles), not the loop
        if i - j > max(1, best[1] - best[0]) and not any(j < x < i for x in exits):
            best = (j, i)
    return sum(1 for line in lines[best[0]:best[1] + 1] if op_re.search(line)) if best[1] else 0


def lane_asm_problem(ttgir: str) -> str | None:
    """Why the kernel's inline assembly may read another lane's state (None when it cannot): an asm block that
    reads %laneid without using it itself (its result, a lane-dependent value, is a tensor to Triton, whose
    layout conversions move elements between lanes), or a warp shuffle fed by a value made outside its block
    (kernels/quant.py: _shfl_asm makes the shuffle's table inside the block, from its own %laneid)."""
    import re

    asms = re.findall(r'elementwise_inline_asm "((?:[^"\\]|\\.)*)"', ttgir)
    for a in asms:
        if "%laneid" in a and "shfl.sync" not in a:
            return f"a lane id leaves its asm block: {a[:80]!r}"
        if "shfl.sync" in a and "%laneid" not in a:
            return f"a shuffle's table comes from outside its asm block: {a[:80]!r}"
    return None


def compile_spec(spec: AotSpec, arch: int, sass: bool = False) -> dict:
    """Compile one spec for sm_<arch> with no GPU; return its static report (or the error)."""
    import time

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    row = {"kernel": spec.name, "arch": arch, "gemm": spec.gemm, "max_local_bytes": spec.max_local_bytes}
    t0 = time.perf_counter()
    try:
        attrs = {(spec.fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in spec.divisible}
        src = ASTSource(fn=spec.fn, signature=dict(spec.signature), constexprs=dict(spec.constexprs), attrs=attrs)
        k = triton.compile(
            src,
            target=GPUTarget("cuda", arch, 32),
            options={"num_warps": spec.num_warps, "num_stages": spec.num_stages},
        )
    except Exception as e:  # noqa: BLE001 - reported, the caller decides
        row["error"] = f"{type(e).__name__}: {str(e).strip()[-2000:]}"
        return row
    row["compile_s"] = round(time.perf_counter() - t0, 3)
    ptx = k.asm["ptx"]
    row.update(resource_usage(k.asm["cubin"]))
    row["spills"] = (row["stack"] or 0) + (row["local"] or 0)  # register spills land in the stack frame
    row["shared"] = int(getattr(k.metadata, "shared", 0) or 0)  # bytes Triton requests at launch
    row["wgmma"] = "wgmma" in ptx
    row["mma"] = "mma.sync" in ptx
    row["tma"] = "cp.async.bulk.tensor" in ptx
    row["tma_spec"] = spec.tma
    row["lane_asm"] = lane_asm_problem(k.asm["ttgir"])
    if sass:
        row["sass"] = sass_histogram(k.asm["cubin"])
    return row


def fn_name(spec: AotSpec) -> str:
    """The kernel function's name (a JITFunction, or the interpreter's wrapper of one)."""
    fn = spec.fn
    return getattr(fn, "__name__", None) or getattr(getattr(fn, "fn", None), "__name__", None) or repr(fn)


def _job(mod: str, index: int, arch: int, sass: bool) -> dict:
    spec = collect_specs((mod,))[index][1]
    row = compile_spec(spec, arch, sass)
    row["module"] = mod
    row["fn"] = fn_name(spec)
    return row


def _sample(indices: list[int], n: int) -> list[int]:
    """n evenly spaced entries of `indices` (first and last included), or all of them."""
    if n <= 0 or len(indices) <= n:
        return indices
    if n == 1:
        return indices[:1]
    return sorted({indices[round(i * (len(indices) - 1) / (n - 1))] for i in range(n)})


def compile_all(
    modules=KERNEL_MODULES,
    archs=None,
    jobs: int = 2,
    sass: bool = False,
    name_filter: str = "",
    max_per_kernel: int = 0,
) -> list[dict]:
    """Compile every spec of `modules` for each of its archs (or `archs`), `jobs` processes at a time.

    max_per_kernel > 0 keeps, per kernel function, that many specs evenly spaced over the module's list (the
    CI compile tier's time budget), and one TMA spec more where the function has some; 0 compiles all of
    them (scripts/kernel_report.py's default).
    """
    import concurrent.futures as cf
    import multiprocessing as mp

    work = []
    for mod in modules:
        groups: dict[str, list[int]] = {}
        for i, (_, spec) in enumerate(collect_specs((mod,))):
            if name_filter and name_filter not in spec.name:
                continue
            groups.setdefault((fn_name(spec), spec.tma), []).append(i)
        specs = collect_specs((mod,))
        for (_, tma), idx in groups.items():
            for i in _sample(idx, min(max_per_kernel, 1) if tma else max_per_kernel):
                for arch in archs or specs[i][1].archs:
                    work.append((mod, i, arch, sass))
    if jobs <= 1:
        return [_job(*w) for w in work]
    with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
        return list(pool.map(_job, *zip(*work))) if work else []


def format_table(rows: list[dict], sass: bool = False) -> str:
    cols = ["kernel", "arch", "regs", "shared", "stack", "spills", "tensor_core", "compile_s"]
    if sass:
        cols += list(SASS_OPS) + ["loop"]
    lines = []
    for r in rows:
        if "error" in r:
            lines.append([r["kernel"], f"sm_{r['arch']}", "ERROR: " + r["error"].splitlines()[-1][:120]])
            continue
        tc = "wgmma" if r["wgmma"] else ("mma" if r["mma"] else "-")
        line = [r["kernel"], f"sm_{r['arch']}", r["reg"], r["shared"], r["stack"], r["spills"], tc, r["compile_s"]]
        if sass:
            line += [r["sass"][op] for op in SASS_OPS] + [r["sass"]["loop"]]
        lines.append([str(x) for x in line])
    widths = [max([len(c)] + [len(l[i]) for l in lines if i < len(l)]) for i, c in enumerate(cols)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(cols), fmt(["-" * w for w in widths])] + [fmt(l) for l in lines])


def main(argv=None) -> int:
    """python -m h3moe.kernels.aot [--json] [--sass] [--arch 90] [--filter route] [--jobs 2] [--module ...]
    [--max-per-kernel N]"""
    import argparse
    import json
    import os
    import subprocess
    import sys
    import tempfile

    ap = argparse.ArgumentParser(description="Compile every h3moe Triton kernel for sm_80/sm_90 without a GPU.")
    ap.add_argument("--json", action="store_true", help="print one JSON list of rows")
    ap.add_argument("--sass", action="store_true", help="add a SASS opcode histogram (nvdisasm)")
    ap.add_argument("--arch", type=int, action="append", help="only this arch (repeatable), e.g. 90")
    ap.add_argument("--filter", default="", help="only specs whose name contains this")
    ap.add_argument("--module", action="append", help="only this kernel module (repeatable)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--max-per-kernel", type=int, default=0, help="at most N specs per kernel function (CI)")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        # The interpreter replaces @triton.jit: compile in a child without it.
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        argv = sys.argv[1:] if argv is None else list(argv)
        return subprocess.run([sys.executable, "-m", "h3moe.kernels.aot", *argv], env=env).returncode
    with tempfile.TemporaryDirectory(prefix="h3moe-aot-") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache  # cache by nothing: every run compiles for real
        rows = compile_all(
            tuple(args.module or KERNEL_MODULES), args.arch, args.jobs, args.sass, args.filter, args.max_per_kernel
        )
    if args.json:
        print(json.dumps(rows))
    else:
        print(format_table(rows, args.sass))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
