"""tsdsae: two-stage disentangled sequential autoencoders (TS-DSAE) for music audio."""

__version__ = "0.1.0"
