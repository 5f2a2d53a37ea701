"""Build the optional fused fake-quant CPU kernels; the package metadata lives in pyproject.toml.

``optional=True``: without a working C compiler the install still succeeds and ``functional.py`` uses
its ATen formulas (same values, slower). Without OpenMP support the kernels are built single-threaded.
"""

import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

_UNIX = sys.platform != "win32"
_OPENMP = ["-fopenmp"] if _UNIX else ["/openmp"]


class _BuildExt(build_ext):
    """Build with OpenMP (torch's own runtime at run time); retry without it if the compiler refuses."""

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception:  # noqa: BLE001 - any compiler/linker failure: one retry without OpenMP
            if not set(_OPENMP) & set(ext.extra_compile_args):
                raise
            ext.extra_compile_args = [a for a in ext.extra_compile_args if a not in _OPENMP]
            ext.extra_link_args = [a for a in ext.extra_link_args if a not in _OPENMP]
            super().build_extension(ext)


setup(
    ext_modules=[
        Extension(
            "qat_lightning.quant.backends._kernels",
            ["qat_lightning/quant/backends/_kernels.c"],
            extra_compile_args=(["-O3", "-fno-math-errno", "-Wno-psabi"] if _UNIX else ["/O2"]) + _OPENMP,
            extra_link_args=list(_OPENMP) if _UNIX else [],
            optional=True,
        ),
        Extension(
            "qat_lightning.quant.backends._search_kernels",
            ["qat_lightning/quant/backends/_search_kernels.c"],
            extra_compile_args=(
                ["-O3", "-fno-math-errno", "-ffp-contract=off", "-Wno-psabi"] if _UNIX else ["/O2"]
            )
            + _OPENMP,
            extra_link_args=list(_OPENMP) if _UNIX else [],
            optional=True,
        ),
    ],
    cmdclass={"build_ext": _BuildExt},
)
