"""kvbench.reports."""
