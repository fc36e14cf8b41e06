"""A small, download-free training demo: a byte-level GPT on the Python standard library's source.

Run ``python -m marsm_dist.demo --help``. It sits on the top floor: it only uses the public API.
"""
