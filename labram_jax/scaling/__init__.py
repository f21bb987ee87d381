"""Scaling-law grids: nested data subsets, the grid of pretraining runs, and the fit of their losses."""
