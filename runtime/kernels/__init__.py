"""Numba kernels: flat functions over arrays, knowing nothing of checkpoints."""
