"""Fixtures any test can ask for by name. A new distributed test is a function run on every rank
and a test that checks what the ranks return::

    def my_rank(rank, world_size):
        ...                                  # a gloo group of world_size ranks is initialized
        return something

    def test_it(run_ranks):
        results = run_ranks(my_rank, 2)      # forked ranks, a timeout, a failing rank fails the test
        assert ...

The helpers themselves live in ``tests/helpers/`` (see its docstring).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.helpers.distributed import run_distributed
from tests.helpers.launch_env import launcher_env


@pytest.fixture
def run_ranks() -> Callable[..., list]:
    """``run_ranks(fn, world_size, *args, timeout=180.0)``: ``fn(rank, world_size, *args)`` on
    forked gloo ranks; returns what each rank returned, in rank order."""
    return run_distributed


@pytest.fixture
def launch_env() -> Callable[..., dict[str, str]]:
    """``launch_env(**extra)``: the environment for starting a launch script or recipe as a user
    would (the Python running the tests, no setup step, a free MASTER_PORT)."""
    return launcher_env
