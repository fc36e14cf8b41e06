"""The environment for tests that start launch scripts, recipes and the demo as a user would."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from tests.helpers.distributed import free_port

ROOT = Path(__file__).resolve().parents[2]
MEGATRON_CPU_SITE = ROOT / "tests" / "helpers" / "megatron_cpu_site"


def launcher_env(**extra: str) -> dict[str, str]:
    """``os.environ`` plus what every launched run here needs, then ``extra``.

    - ``MARSM_SKIP_SETUP=1``: the environment running the tests is ready (no ``launch/setup.sh``);
    - ``MARSM_VENV`` and ``PATH``: the scripts use the Python running the tests (``sys.prefix``
      when it is a virtual environment with ``bin/python``, as the launch scripts expect);
    - a free ``MASTER_PORT``, so concurrent launches do not collide.
    """
    env = dict(os.environ, MARSM_SKIP_SETUP="1", MASTER_PORT=str(free_port()))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    if (Path(sys.prefix) / "bin" / "python").exists():
        env["MARSM_VENV"] = sys.prefix
    env.update(extra)
    return env


def megatron_cpu_env(**extra: str) -> dict[str, str]:
    """:func:`launcher_env` for megatron-core's GPT on CPU ranks: the test-only CUDA shim is put into
    every process through ``sitecustomize`` (``tests/helpers/megatron_cpu_site``), one thread a rank."""
    return launcher_env(MARSM_TEST_MEGATRON_CPU="1", OMP_NUM_THREADS="1",
                        PYTHONPATH=os.pathsep.join([str(ROOT), str(MEGATRON_CPU_SITE)]), **extra)
