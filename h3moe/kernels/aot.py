"""Ahead-of-time compile specs for the compile tier (no GPU needed).

Every Triton kernel module in h3moe/kernels/ exposes `aot_specs() -> list[AotSpec]`: one spec per kernel,
dtype and autotune configuration it can pick at run time. The compile tier (tests/test_compile_tier.py,
scripts/kernel_report.py) compiles each for sm_80 and sm_90 with `triton.compile(ASTSource(...),
target=GPUTarget("cuda", arch, 32))` and reads registers, shared memory and spills with the cuobjdump that
ships in the Triton wheel. Must run with TRITON_INTERPRET unset (the interpreter replaces @triton.jit).
"""
from __future__ import annotations

from dataclasses import dataclass, field

#: Modules whose aot_specs() the compile tier collects.
KERNEL_MODULES = (
    "h3moe.kernels.routing",
    "h3moe.kernels.gating_loss",
    "h3moe.kernels.experts",
    "h3moe.kernels.quant",
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
