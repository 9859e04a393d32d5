"""Builds shapstream's compiled TreeSHAP kernel; all other metadata lives in pyproject.toml.

Plain C against the CPython API and the buffer protocol (no numpy headers needed), -O3
without -march=native or -ffast-math so the wheel runs on any x86-64/arm64 machine and
NaN tests stay exact.
"""

from setuptools import Extension, setup

NATIVE = "service/core/engine/_native"

setup(
    ext_modules=[
        Extension(
            "service.core.engine._native._treeshap",
            sources=[f"{NATIVE}/{name}.c" for name in ("module", "forest", "shap", "predict")],
            depends=[f"{NATIVE}/treeshap.h"],
            extra_compile_args=["-O3", "-std=c11", "-fno-strict-aliasing", "-Wall", "-Wextra"],
        )
    ],
    package_data={
        "service.core.engine._native": ["*.pyi", "*.c", "*.h"],
        "service.api.ui": ["templates/*.html", "static/*"],
    },
)
