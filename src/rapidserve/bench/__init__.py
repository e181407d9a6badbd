"""Benchmarks: the device's ceilings and the floors they set (floors), an offline throughput run
(throughput, with an optional transformers peer) and per-step decode / prefill latency (latency).
"""
