"""h3moe benchmarks: speed and numerics of every kernel against eager PyTorch and transformers' experts
implementations.

    python -m bench [--quick] [--budget-s S] [--out F.json] [--plot]   (also `h3moe bench`)
    pytest bench/ --benchmark-only                                      (pytest-benchmark suites)

Layout: cases.py (shapes, inputs, fp32 references, FLOP/byte models) · impls.py (h3moe backends and the
baselines behind one interface) · timing.py (do_bench-style timing, device ceilings) · report.py (JSON
schema, targets, Markdown) · plot.py (charts) · driver.py (the command line).
"""


def main(argv=None) -> int:
    """Run the benchmark driver with these command-line arguments (None: sys.argv)."""
    from .driver import main as _main

    return _main(argv)


__all__ = ["main"]
