"""GPU resources shared between workers: MPS control (mps.py), SM partitioning mechanisms
(partition.py), the offline profile (profile.py, measured by profiler.py) and the partitioning
policies (policy.py)."""
