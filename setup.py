"""Build the optional fused fake-quant CPU kernels; the package metadata lives in pyproject.toml.

``optional=True``: without a working C compiler the install still succeeds and ``functional.py`` uses
its ATen formulas (same values, slower).
"""

import sys

from setuptools import Extension, setup

_ARGS = ["-O3", "-fno-math-errno", "-pthread"] if sys.platform != "win32" else ["/O2"]

setup(
    ext_modules=[
        Extension(
            "qat_lightning.quant._kernels",
            ["qat_lightning/quant/_kernels.c"],
            extra_compile_args=_ARGS,
            extra_link_args=["-pthread"] if sys.platform != "win32" else [],
            optional=True,
        )
    ]
)
