"""The DSAE model family: one module per probabilistic factor, composed in `dsae.py`."""
from tsdsae.model.dsae import DSAE, Outputs, count_parameters

__all__ = ["DSAE", "Outputs", "count_parameters"]
