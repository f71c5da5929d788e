"""CPU decoding on native kernels, applied to a built model from outside (work in progress)."""
