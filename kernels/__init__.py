"""Kernels of the TEMPO trainer, each beside its pure-PyTorch reference.

Installed as `tempo_kernels`; independent of the `tempo` package (never imports it).
"""
