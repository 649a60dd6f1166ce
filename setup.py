"""Build hook: compiles csrc/ into the C-ABI library libh3moe_cuda.so with CMake when nvcc is found.

The library has no torch dependency (plain C ABI, loaded by ctypes in h3moe/_lib.py), so it builds
the same against any torch. `H3MOE_CUDA=0` skips it; `H3MOE_CUDA_ARCHS` picks the architectures
(default "80;90a"); a failed build never breaks the install: the package imports and runs its torch and
triton backends without it.

Where the library lands:
  - `pip install -e .` (PEP 660): pip runs `editable_wheel`, which runs `build_py` with editable_mode set
    (the legacy `develop` command does not run); the library goes to h3moe/lib/ in the source tree.
  - `setup.py develop` (legacy): the same place.
  - `pip install .` / wheels: h3moe/lib/ inside the build directory, so it ships in the wheel.
The CMake build directory build/csrc/ is kept, so a reinstall only rebuilds what changed.
"""
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.develop import develop

ROOT = Path(__file__).resolve().parent
LIB = "libh3moe_cuda.so"


def _log(msg: str) -> None:
    print(f"h3moe: {msg}", file=sys.stderr, flush=True)


def _nvcc() -> Path | None:
    found = shutil.which("nvcc")
    if found:
        return Path(found)
    cand = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc"
    return cand if cand.exists() else None


def build_cuda_lib(dest: Path) -> bool:
    """Configure and build csrc/ with CMake, copy the library to `dest`. Never raises."""
    if os.environ.get("H3MOE_CUDA", "1") == "0":
        _log("H3MOE_CUDA=0, skipping csrc/")
        return False
    nvcc = _nvcc()
    if nvcc is None or shutil.which("cmake") is None or not (ROOT / "CMakeLists.txt").exists():
        _log("nvcc or cmake not found, skipping csrc/ (torch/triton backends only)")
        return False
    build = ROOT / "build" / "csrc"
    archs = os.environ.get("H3MOE_CUDA_ARCHS", "80;90a")
    jobs = os.environ.get("H3MOE_BUILD_JOBS", str(os.cpu_count() or 2))
    t0 = time.time()
    try:
        build.mkdir(parents=True, exist_ok=True)
        cfg = ["cmake", "-S", str(ROOT), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
               f"-DCMAKE_CUDA_COMPILER={nvcc}", f"-DH3MOE_CUDA_ARCHS={archs}"]
        if shutil.which("ninja") and not (build / "CMakeCache.txt").exists():
            cfg += ["-G", "Ninja"]
        subprocess.check_call(cfg, stdout=sys.stderr)
        subprocess.check_call(["cmake", "--build", str(build), "-j", jobs], stdout=sys.stderr)
        src = build / LIB
        if not src.exists():
            raise FileNotFoundError(src)
        dest.mkdir(parents=True, exist_ok=True)
        tmp = dest / (LIB + ".tmp")
        shutil.copy2(src, tmp)
        os.replace(tmp, dest / LIB)  # atomic: a process that has the old one loaded keeps it
    except (subprocess.CalledProcessError, OSError) as e:  # never break the install
        _log(f"csrc/ build failed ({e}); continuing without the cuda backend")
        return False
    _log(f"built {dest / LIB} for archs {archs} in {time.time() - t0:.0f} s")
    return True


class BuildPy(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            build_cuda_lib(ROOT / "h3moe" / "lib")  # the source tree is what an editable install imports
        else:
            build_cuda_lib(Path(self.build_lib) / "h3moe" / "lib")


class Develop(develop):
    def run(self):
        build_cuda_lib(ROOT / "h3moe" / "lib")
        super().run()


setup(cmdclass={"build_py": BuildPy, "develop": Develop})
