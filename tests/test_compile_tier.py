"""Compile tier: every Triton kernel configuration h3moe can launch, compiled ahead of time for sm_80 and
sm_90 on this CPU machine (no GPU), with static checks: it compiles, nothing spills past its bound, and the
tensor-core GEMMs use wgmma on Hopper (mma.sync on Ampere).

One child process (`python -m h3moe.kernels.aot --json`, 2 compile workers, a fresh Triton cache) compiles
everything: this test process runs with TRITON_INTERPRET=1 (conftest), under which @triton.jit is the
interpreter. The same rows print as a table with scripts/kernel_report.py.
"""
import importlib
import importlib.util
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from h3moe.kernels import aot  # noqa: E402

pytestmark = pytest.mark.compile

#: Specs compiled per kernel function, evenly spaced over each module's list: all ~150 configurations take
#: ~3.5 CPU-minutes, over the CI budget; `python scripts/kernel_report.py` compiles every one.
MAX_PER_KERNEL = int(os.environ.get("H3MOE_AOT_MAX_PER_KERNEL", "4"))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _have_tools() -> bool:
    try:
        return os.path.exists(os.path.join(aot._bin_dir(), "cuobjdump"))
    except Exception:  # noqa: BLE001
        return False


@pytest.fixture(scope="module")
def rows():
    if not _have_tools():
        pytest.skip("the Triton wheel has no cuobjdump (backends/nvidia/bin)")
    proc = subprocess.run(
        [sys.executable, "-m", "h3moe.kernels.aot", "--json", "--jobs", "2", "--max-per-kernel", str(MAX_PER_KERNEL)],
        capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=900,
    )  # fmt: skip
    out = proc.stdout.strip().splitlines()
    assert out, f"the compile tier printed nothing (rc={proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(out[-1])


@pytest.fixture(scope="module")
def specs():
    return aot.collect_specs()


def test_every_kernel_module_is_collected(specs, rows):
    present = [m for m in aot.KERNEL_MODULES if importlib.util.find_spec(m) is not None]
    with_specs = [m for m in present if hasattr(importlib.import_module(m), "aot_specs")]
    assert "h3moe.kernels.routing" in with_specs and "h3moe.kernels.gating_loss" in with_specs
    assert {mod for mod, _ in specs} == set(with_specs)
    assert {r["module"] for r in rows} == set(with_specs)
    names = [s.name for _, s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    assert not dupes, f"spec names must be unique: {dupes}"
    # Every kernel function is compiled, for both sm_80 and sm_90 (a config may be sm_90-only).
    compiled = {(r["module"], r["fn"], r["arch"]) for r in rows}
    missing = sorted({(m, aot.fn_name(s), a) for m, s in specs for a in (80, 90)} - compiled)
    assert not missing, f"kernel functions not compiled for an arch: {missing}"
    by_name = {s.name: s for _, s in specs}
    for r in rows:
        assert r["arch"] in by_name[r["kernel"]].archs


def test_all_compile(rows):
    errors = [f"{r['kernel']} sm_{r['arch']}: {r['error']}" for r in rows if "error" in r]
    assert not errors, "\n\n".join(errors)


def test_no_spills(rows):
    bad = [
        f"{r['kernel']} sm_{r['arch']}: {r['spills']} bytes of stack/local > bound {r['max_local_bytes']}"
        for r in rows
        if "error" not in r and r["spills"] > r["max_local_bytes"]
    ]
    assert not bad, "\n".join(bad)


def test_inline_asm_keeps_lane_state_in_its_block(rows):
    """A lane-dependent value made in one inline-asm op and used in another can be moved between lanes by
    Triton's layout conversions (it happened: the shuffle lookup's table in the tensor-core quantized kernels);
    every asm block that needs its lane id makes and uses it itself (aot.lane_asm_problem)."""
    bad = [f"{r['kernel']} sm_{r['arch']}: {r['lane_asm']}" for r in rows if r.get("lane_asm")]
    assert not bad, "\n".join(bad)
    assert any("lane_asm" in r for r in rows)


def test_lane_asm_problem_reads_both_hazards():
    ok = 'x = tt.elementwise_inline_asm "{\\0Amov.u32 l, %laneid;\\0Ashfl.sync.idx.b32 $0, t, $8, 0x1f;\\0A}" {}'
    assert aot.lane_asm_problem(ok) is None
    split = ('a = tt.elementwise_inline_asm "mov.u32 $0, %laneid;" {}\n'
             'b = tt.elementwise_inline_asm "shfl.sync.idx.b32 $0, $1, $2, 0x1f, 0xffffffff;" {}')
    assert "lane id leaves" in aot.lane_asm_problem(split)
    assert "from outside" in aot.lane_asm_problem(split.splitlines()[1])
    assert aot.lane_asm_problem("no asm here") is None


def test_registers_fit(rows):
    bad = [f"{r['kernel']} sm_{r['arch']}: {r['reg']} registers" for r in rows if "error" not in r and not 0 < r["reg"] <= 255]
    assert not bad, "\n".join(bad)


def test_gemms_use_tensor_cores(rows):
    gemms = [r for r in rows if r["gemm"] and "error" not in r]
    bad = [f"{r['kernel']} sm_90: no wgmma in the PTX" for r in gemms if r["arch"] == 90 and not r["wgmma"]]
    bad += [f"{r['kernel']} sm_80: no mma.sync in the PTX" for r in gemms if r["arch"] == 80 and not r["mma"]]
    assert not bad, "\n".join(bad)


def test_tma_specs_load_through_tma(rows):
    """The Tma candidates (sm_90 only) issue TMA loads (cp.async.bulk.tensor); the sample holds one per
    experts kernel function; the others load through pointers (the check tells them apart)."""
    ok = [r for r in rows if "error" not in r]
    tma = [r for r in ok if r["tma_spec"]]
    assert {r["fn"] for r in tma} >= {"_gate_up_kernel", "_down_kernel", "_wgrad_kernel"}
    assert all(r["arch"] == 90 for r in tma)
    bad = [f"{r['kernel']}: no cp.async.bulk.tensor in the PTX" for r in tma if not r["tma"]]
    bad += [f"{r['kernel']}: TMA loads in a pointer-load config" for r in ok
            if r["module"] == "h3moe.kernels.experts" and not r["tma_spec"] and r["tma"]]
    assert not bad, "\n".join(bad)


def test_routing_kernels_are_not_gemms(rows):
    # The static checks can tell kernels apart: routing and gating are reductions, not tensor-core GEMMs.
    for r in rows:
        if r["module"] in ("h3moe.kernels.routing", "h3moe.kernels.gating_loss") and "error" not in r:
            assert not r["wgmma"] and not r["gemm"], r["kernel"]


def test_kernel_report_script():
    if not _have_tools():
        pytest.skip("the Triton wheel has no cuobjdump")
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "kernel_report.py"), "--sass", "--arch", "90", "--jobs", "1",
         "--module", "h3moe.kernels.routing", "--filter", "route_scatter[E=8,"],
        capture_output=True, text=True, env=dict(os.environ), cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    header = lines[0].split()
    for col in ("kernel", "arch", "regs", "shared", "spills", "tensor_core", "HGMMA", "HMMA", "LDL", "STL"):
        assert col in header
    body = [l.split() for l in lines[2:]]
    assert len(body) == 1 and body[0][0] == "route_scatter[E=8,K=2]" and body[0][1] == "sm_90"
    row = dict(zip(header, body[0]))
    assert int(row["regs"]) > 0 and row["LDL"] == "0" and row["STL"] == "0" and int(row["STG"]) > 0
    assert row["loop"].isdigit()  # the longest loop body's instructions (0: no loop)


def test_main_loop_count_reads_the_longest_backward_branch():
    """kernel_report's `loop` column: instructions from a label to the last branch back to it (the K loop),
    predicated or not; a BRA.DIV (divergence slow path), a forward branch or the trap after EXIT opens none."""
    import re

    from h3moe.kernels.aot import _main_loop

    def ins(addr, text):
        return f"        /*{addr:04x}*/                   {text} ;"

    sass = "\n".join([
        ins(0x00, "S2R R0, SR_TID.X"),
        ".L_x_1:",
        ins(0x10, "LDG.E.128 R4, desc[UR4][R2.64]"),
        ins(0x20, "BRA.DIV UR4, `(.L_x_9)"),
        ".L_x_2:",
        ins(0x30, "FFMA R8, R4, R5, R8"),
        ins(0x40, "@P1 BRA `(.L_x_2)"),  # an inner loop: 2 instructions
        ins(0x50, "SHFL.IDX PT, R9, R8, R7, 0x1f"),
        ins(0x60, "@!P0 BRA `(.L_x_1)"),  # the outer loop: 6 instructions
        ins(0x70, "@P2 BRA `(.L_x_3)"),  # forward
        ".L_x_3:",
        ins(0x80, "EXIT"),
    ])
    op_re = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9]*)")
    assert _main_loop(sass, op_re) == 6
    assert _main_loop("\n".join([ins(0, "EXIT")]), op_re) == 0
    # sm_80's form: the exit test at the top, an unconditional branch back; the trap after EXIT is no loop
    top = "\n".join([
        ".L_x_1:",
        ins(0x00, "ISETP.GE.AND P0, PT, R2, 0x1000, PT"),
        ins(0x10, "@P0 BRA `(.L_x_0)"),
        ins(0x20, "FFMA R8, R4, R5, R8"),
        ins(0x30, "BRA `(.L_x_1)"),
        ".L_x_0:",
        ins(0x40, "EXIT"),
        ".L_x_2:",
        ins(0x50, "BRA `(.L_x_2)"),
    ])
    assert _main_loop(top, op_re) == 4
    # a divergence slow path after EXIT that branches back into the loop is not the loop
    slow = "\n".join([
        ".L_x_1:",
        ins(0x00, "BRA.DIV UR4, `(.L_x_9)"),
        ins(0x10, "SHFL.IDX PT, R9, R8, R7, 0x1f"),
        ".L_x_2:",
        ins(0x20, "FFMA R8, R4, R5, R8"),
        ins(0x30, "@P0 BRA `(.L_x_1)"),  # the loop: 4 instructions
        ins(0x40, "EXIT"),
        ".L_x_9:",
        ins(0x50, "WARPSYNC.COLLECTIVE R20, `(.L_x_10)"),
        ins(0x60, "SHFL.IDX P2, R9, R8, R7, R21"),
        ins(0x70, "ENDCOLLECTIVE"),
        ".L_x_10:",
        ins(0x80, "BRA `(.L_x_2)"),
    ])
    assert _main_loop(slow, op_re) == 4
    assert _main_loop("\n".join([ins(0, "EXIT"), ".L_x_2:", ins(0x10, "BRA `(.L_x_2)")]), op_re) == 0
