"""Build hook: compiles csrc/ into the C-ABI library libh3moe_cuda.so with CMake when nvcc is found.

The library has no torch dependency (plain C ABI, loaded by ctypes in h3moe/_lib.py), so it builds
the same against any torch. `H3MOE_CUDA=0` skips it; a failed build never breaks the install: the
package imports and runs its torch and triton backends without it.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.develop import develop

ROOT = Path(__file__).resolve().parent


def build_cuda_lib(dest: Path) -> None:
    if os.environ.get("H3MOE_CUDA", "1") == "0":
        print("h3moe: H3MOE_CUDA=0, skipping csrc/", file=sys.stderr)
        return
    nvcc = shutil.which("nvcc") or (Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc")
    if not Path(nvcc).exists() or shutil.which("cmake") is None or not (ROOT / "CMakeLists.txt").exists():
        print("h3moe: nvcc or cmake not found, skipping csrc/ (torch/triton backends only)", file=sys.stderr)
        return
    build = ROOT / "build" / "csrc"
    build.mkdir(parents=True, exist_ok=True)
    archs = os.environ.get("H3MOE_CUDA_ARCHS", "80;90a")
    try:
        subprocess.check_call(["cmake", "-S", str(ROOT), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                               f"-DCMAKE_CUDA_COMPILER={nvcc}", f"-DH3MOE_CUDA_ARCHS={archs}"])
        subprocess.check_call(["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2)])
    except (subprocess.CalledProcessError, OSError) as e:  # never break the install
        print(f"h3moe: csrc/ build failed ({e}); continuing without the cuda backend", file=sys.stderr)
        return
    dest.mkdir(parents=True, exist_ok=True)
    for so in build.glob("libh3moe_cuda*.so"):
        shutil.copy2(so, dest / so.name)


class BuildPy(build_py):
    def run(self):
        super().run()
        build_cuda_lib(Path(self.build_lib) / "h3moe" / "lib")


class Develop(develop):
    def run(self):
        build_cuda_lib(ROOT / "h3moe" / "lib")
        super().run()


setup(cmdclass={"build_py": BuildPy, "develop": Develop})
