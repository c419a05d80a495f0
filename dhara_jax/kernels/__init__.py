"""Custom kernels (Pallas TPU/GPU with XLA fallbacks), one subpackage per op."""
