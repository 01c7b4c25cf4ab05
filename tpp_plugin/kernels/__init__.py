"""Fused GPU kernels: the kernel twin of :mod:`tpp_plugin.functional` (``cupy``)."""
