"""Launching: the plan (placement and memory) checked before anything starts; `pipeline/submit.py`
runs the same checks before it submits to Slurm."""
