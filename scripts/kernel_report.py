#!/usr/bin/env python
"""Static report of every h3moe Triton kernel, compiled for sm_80 and sm_90 on a machine without a GPU.

    python scripts/kernel_report.py                  # table: kernel, arch, regs, shared, stack, spills, wgmma/mma
    python scripts/kernel_report.py --json           # the same rows as JSON
    python scripts/kernel_report.py --sass           # + SASS opcode counts (HGMMA, HMMA, LDL, STL, ...) via nvdisasm
    python scripts/kernel_report.py --arch 90 --filter experts --module h3moe.kernels.experts

Each kernel configuration the launchers can pick is listed by its module's aot_specs() (h3moe/kernels/aot.py);
`triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))` builds it and the cuobjdump / nvdisasm that
ship in the Triton wheel read registers, shared memory and spills. TRITON_INTERPRET is dropped (a child process
compiles) and the Triton cache is a fresh temporary folder, so every number comes from a real compile.
Exit status 1 when a kernel fails to compile.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from h3moe.kernels.aot import main  # noqa: E402  (triton is imported lazily, after the env check)

if __name__ == "__main__":
    raise SystemExit(main())
