"""The application side of ebpf-bridge: writes this thread's context into the pinned map.

Applications use the public API re-exported by ``bridge`` (``bridge.annotate`` and friends);
the modules here are its implementation. Standard library only.
"""
