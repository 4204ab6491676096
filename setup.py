"""Build the `repomem.native` C extension; everything else is declared in pyproject.toml."""

import sys
from pathlib import Path

from setuptools import Extension, setup

sources = sorted(str(p) for p in Path("native").glob("*.c"))
extra = ["/O2"] if sys.platform == "win32" else ["-O3", "-std=c11", "-Wall", "-Wextra", "-fvisibility=hidden"]

setup(
    ext_modules=[
        Extension(
            "repomem.native._kvsplice",
            sources=sources,
            depends=[str(p) for p in Path("native").glob("*.h")],
            extra_compile_args=extra,
        )
    ]
)
