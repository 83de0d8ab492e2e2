"""Build hook for the optional C accelerator; everything else lives in pyproject.toml.

``sdk_side._fastbpf`` is optional: without a C compiler or Python headers the install goes on
and ``sdk_side._bpf`` uses ctypes and pure Python instead (about 0.8 us more per steady
``annotate`` and 1.4 us more on the first call of a request, measured on the 2-core VM).
``kernel_side._fastwire`` (the agent's OTLP protobuf encoder) is optional in the same way:
without it ``kernel_side.export.otlp_wire`` writes the same bytes in Python (about 8 us more
per span, measured with bench/pipeline_bench.py on the 2-core VM).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "sdk_side._fastbpf",
            sources=["sdk_side/_fastbpf.c"],
            optional=True,
            extra_compile_args=["-O2", "-Wall", "-Wextra"],
        ),
        Extension(
            "kernel_side._fasthttp",
            sources=["kernel_side/_fasthttp.c"],
            optional=True,
            extra_compile_args=["-O2", "-Wall", "-Wextra"],
        ),
        Extension(
            "kernel_side._fastwire",
            sources=["kernel_side/_fastwire.c"],
            optional=True,
            extra_compile_args=["-O2", "-Wall", "-Wextra"],
        ),
        Extension(
            "kernel_side._fastjson",
            sources=["kernel_side/_fastjson.c"],
            optional=True,
            extra_compile_args=["-O2", "-Wall", "-Wextra"],
        ),
    ]
)
