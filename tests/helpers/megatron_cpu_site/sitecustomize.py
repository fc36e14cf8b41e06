"""Test-only: with this directory on PYTHONPATH and MARSM_TEST_MEGATRON_CPU=1, every Python process
(e.g. the ranks torchrun starts) runs megatron-core's CUDA-only code paths on the CPU, through
tests/helpers/megatron_cpu_shim.py. Lets the launcher test run the real Megatron entry script unchanged."""
import os

if os.environ.get("MARSM_TEST_MEGATRON_CPU") == "1" and os.environ.get("LOCAL_RANK") is not None:
    from tests.helpers.megatron_cpu_shim import install

    install(fake_cuda_type=True)
