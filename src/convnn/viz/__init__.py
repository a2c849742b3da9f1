"""Plots: learning curves and run comparisons (matplotlib is imported only when plotting)."""

from .curves import plot_comparison, plot_curves

__all__ = ["plot_comparison", "plot_curves"]
