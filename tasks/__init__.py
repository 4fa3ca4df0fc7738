"""kvbench.tasks."""
