"""Ray Tune robustness sweeps over tsdsae configurations, and their reports."""
