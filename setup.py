"""Build hook for the optional C accelerator; everything else lives in pyproject.toml.

``sdk_side._fastbpf`` is optional: without a C compiler or Python headers the install goes on
and ``sdk_side._bpf`` uses ctypes instead (about 0.4-0.6 us more per ``annotate``).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "sdk_side._fastbpf",
            sources=["sdk_side/_fastbpf.c"],
            optional=True,
            extra_compile_args=["-O2", "-Wall", "-Wextra"],
        )
    ]
)
