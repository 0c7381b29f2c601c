"""Builds glakeserve._vmm, the C++ allocator, from vmm_allocator/.

The extension needs no CUDA at build time: libcuda is opened at run time. When cuda.h happens to
be installed, its struct layouts are checked against ours at compile time.
"""
import os
from pathlib import Path

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

sources = sorted(str(p) for p in Path("vmm_allocator").glob("*.cpp"))
cuda_include = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include"
macros = [("GLAKE_HAVE_CUDA_H", "1")] if (cuda_include / "cuda.h").exists() else []

extension = Pybind11Extension(
    "glakeserve._vmm",
    sources,
    include_dirs=["vmm_allocator"] + ([str(cuda_include)] if macros else []),
    define_macros=macros,
    cxx_std=17,
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
    libraries=["dl", "pthread"],
)

setup(ext_modules=[extension], cmdclass={"build_ext": build_ext})
