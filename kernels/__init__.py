"""Triton kernels (installed as para_train.kernels; knows nothing of para_train)."""
