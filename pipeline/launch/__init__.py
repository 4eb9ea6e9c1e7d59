"""Launching: the plan (placement and memory) checked before anything starts, and Slurm submission."""
