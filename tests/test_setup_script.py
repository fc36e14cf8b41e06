"""launch/setup.sh runs pip only when something changed (its stamp), with the extras asked for.

The "virtual environment" here is a directory whose ``bin/python`` runs the Python running the
tests but records ``-m pip`` calls instead of making them, so nothing is installed.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FAKE_PYTHON = """#!{real}
import json, os, sys
args = sys.argv[1:]
if args[:2] == ["-m", "pip"]:
    pins = []
    if "-c" in args:
        with open(args[args.index("-c") + 1]) as f:
            pins = [line.strip() for line in f if line.startswith("torch==")]
    with open({log!r}, "a") as f:
        f.write(json.dumps({{"args": args[2:], "torch_constraints": pins}}) + "\\n")
    sys.exit(0)
os.execv({real!r}, [{real!r}, *args])
"""


def make_venv(tmp_path: Path) -> tuple[Path, Path]:
    venv, log = tmp_path / "venv", tmp_path / "pip.log"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(FAKE_PYTHON.format(real=sys.executable, log=str(log)))
    python.chmod(python.stat().st_mode | stat.S_IXUSR)
    return venv, log


def setup(venv: Path, log: Path, *args: str, **env: str) -> list[dict]:
    """Run launch/setup.sh; return the pip calls it made."""
    log.unlink(missing_ok=True)
    base = {k: v for k, v in os.environ.items() if not k.startswith("MARSM_")}
    torch_version = importlib.metadata.version("torch").split("+")[0]
    full_env = {**base, "MARSM_VENV": str(venv), "MARSM_TORCH": torch_version, "MARSM_TORCH_INDEX": "default",
                **env}
    subprocess.run(["bash", str(ROOT / "launch" / "setup.sh"), *args], env=full_env, check=True,
                   capture_output=True, text=True, timeout=60)
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_stamp_skips_pip_when_nothing_changed(tmp_path):
    venv, log = make_venv(tmp_path)
    calls = setup(venv, log, "demo")
    assert [c["args"][-2:] for c in calls] == [["-e", ".[demo]"]]  # torch is there: only the package
    assert (venv / ".marsm-setup-stamp").exists()
    assert setup(venv, log, "demo") == []
    assert setup(venv, log, "") == []  # no extras: covered
    calls = setup(venv, log, "dev,demo")  # a new extra: installs
    assert [c["args"][-1] for c in calls] == [".[dev,demo]"]
    assert setup(venv, log, "dev") == []  # the stamp keeps both
    assert setup(venv, log, "demo", MARSM_EXTRAS="dev") == []  # MARSM_EXTRAS wins over the argument
    assert setup(venv, log, MARSM_SKIP_SETUP="1") == []


def test_new_torch_pin_reinstalls_with_its_constraint(tmp_path):
    venv, log = make_venv(tmp_path)
    setup(venv, log, "demo")
    calls = setup(venv, log, "demo", MARSM_TORCH="2.99.0")  # the stamp's hash covers the pin
    assert [c["args"][-1] for c in calls] == ["torch==2.99.0", ".[demo]"]
    assert calls[1]["torch_constraints"] == ["torch==2.99.0"]  # not launch/constraints.txt's pin
