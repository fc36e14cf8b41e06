"""Benchmarks and the GPU check (``python -m benchmarks.gpu_check``); the scripts also run alone."""
