"""kvbench.harness."""
