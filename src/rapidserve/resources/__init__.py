"""GPU resources shared between workers: MPS control (mps.py), SM partitioning mechanisms
(partition.py), the offline profile (profile.py, measured by profiler.py), the step-cost model
fitted to it (cost_model.py) and the partitioning policies that predict with it (policy.py)."""
