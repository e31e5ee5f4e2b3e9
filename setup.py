"""Installs the pure-Python package, and compiles the CUDA kernels in csrc/ with nvcc when it is present.

KPRO_CUDA_BUILD=auto (default): compile when nvcc is found; a failed compile is reported and the
    install goes on without the CUDA backend (it never fails for lack of a GPU or toolkit).
KPRO_CUDA_BUILD=1: compiling is required; a missing nvcc or csrc/ or a compile error fails the install (CI).
KPRO_CUDA_BUILD=0: never compile.
Any other value is an error.
"""
import importlib.util
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.bdist_wheel import bdist_wheel
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def load_builder():
    spec = importlib.util.spec_from_file_location("kpro_cuda_build", ROOT / "kpro" / "_cuda_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildPyWithCuda(build_py):
    def run(self):
        builder = load_builder()
        mode = builder.build_mode()  # before building anything: an unknown value is an error
        in_place = getattr(self, "editable_mode", False)
        copy = Path(self.build_lib).resolve() / "kpro"
        if not in_place and copy != ROOT / "kpro" and copy.is_dir():
            # build/lib is reused across builds of a tree: a module deleted from kpro/ would ship in this wheel
            shutil.rmtree(copy)
        super().run()
        out_dir = (ROOT if in_place else Path(self.build_lib)) / "kpro" / "_lib"
        builder.build_for_install(ROOT / "csrc", out_dir, mode)


class BdistWheelWithCuda(bdist_wheel):
    """A wheel holding the compiled library is tagged for this platform (py3-none-linux_x86_64, not
    py3-none-any): the library is machine code, though no Python extension, so any Python 3 and ABI fits."""

    def get_tag(self):
        # Decided here, after the build (whether it compiled is known only then): run() calls get_tag()
        # once the files are in bdist_dir and before write_wheelfile() reads root_is_pure.
        if (Path(self.bdist_dir) / "kpro" / "_lib" / "libkpro_cuda.so").is_file():
            self.root_is_pure = False
            return "py3", "none", super().get_tag()[2]
        return super().get_tag()


setup(cmdclass={"build_py": BuildPyWithCuda, "bdist_wheel": BdistWheelWithCuda})
