"""The demo launcher restarts a run once when a rank is killed by a signal (a rare SIGSEGV inside
torch's runtime), and fails at once on an ordinary error. Ranks are forked, so a stand-in worker
patched into the launcher module plays the rank."""

from __future__ import annotations

import argparse
import os
import signal

import pytest

from marsm_dist.demo import launch


def _worker_factory(marker: str, fail: str):
    def worker(args):
        if os.environ["RANK"] == "0" and not os.path.exists(marker):
            open(marker, "w").close()
            if fail == "signal":
                os.kill(os.getpid(), signal.SIGSEGV)
            os._exit(1)  # an ordinary error (its traceback would be printed)
        os._exit(0)
    return worker


@pytest.mark.parametrize(("fail", "code", "attempts_seen"), [("signal", 0, "2 of 2"), ("error", 1, None)])
def test_a_rank_killed_by_a_signal_gets_the_run_started_again(tmp_path, monkeypatch, capsys, fail, code,
                                                              attempts_seen):
    marker = str(tmp_path / "first_attempt")
    monkeypatch.setattr(launch, "run_worker", _worker_factory(marker, fail))
    assert launch.spawn(argparse.Namespace(), 2) == code
    err = capsys.readouterr().err
    if attempts_seen:
        assert "killed by SIGSEGV" in err and attempts_seen in err
    else:
        assert "starting the run again" not in err
