"""Benchmarks of tempme_fast: merge ops and whole-model encoding, on CPU and CUDA GPUs."""
