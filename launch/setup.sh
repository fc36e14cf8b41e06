#!/usr/bin/env bash
# Create the project's virtual environment (.venv, or $MARSM_VENV) and install marsm-dist into it
# (editable) with the extras a command needs:
#
#   bash launch/setup.sh [EXTRAS]     # e.g. "demo"; default: everything the tests use
#
# torch (MARSM_TORCH, default 2.13.0) is installed first and on its own by launch/install_torch.sh:
# the CPU build from PyTorch's CPU wheel index on a machine without an NVIDIA GPU, the default
# build on one with it. Asked for unpinned (or through another package's requirements) pip would
# resolve torch to a multi-GB CUDA build. The project's own range (torch>=2.6,<2.15) is then
# already satisfied, so nothing else pulls a torch.
#
# Extras: MARSM_EXTRAS if set, else the argument ("" for none), else "dev,deepspeed,megatron,demo,mpi,clients"
# (the test tools, the frameworks whose adapters the tests exercise, matplotlib for the demo's
# plot, mpi4py with the mpich wheel for launch/mpirun.sh, and the trainers whose recipes live in
# integrations/: transformers, accelerate, lightning, torchtitan). Versions: launch/constraints.txt.
#
# Nothing is installed when nothing changed: $venv/.marsm-setup-stamp records a hash of
# pyproject.toml, launch/constraints.txt, the torch pin and this checkout's path, and the extras
# installed; a later call whose hash matches and whose extras are among those returns at once
# without running pip (delete the stamp to force a new install).
set -euo pipefail
cd "$(dirname "$0")/.."
# MARSM_SKIP_SETUP=1: the environment is ready (tests that start launch scripts set it).
[ "${MARSM_SKIP_SETUP:-0}" = 1 ] && exit 0
venv="${MARSM_VENV:-.venv}"
extras="${MARSM_EXTRAS:-${1-dev,deepspeed,megatron,demo,mpi,clients}}"
pin="${MARSM_TORCH:-2.13.0}"
stamp="$venv/.marsm-setup-stamp"
if [ ! -x "$venv/bin/python" ]; then
    echo "setup: creating $venv"
    "${PYTHON:-python3}" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check -U pip
fi
py="$venv/bin/python"

# stamp_check: exit 0 when the stamp covers this request. stamp_write: record it (the extras of a
# stamp with the same hash are kept: they are still installed).
stamp_tool() {
    "$py" - "$1" "$stamp" "$extras" "$pin" "$PWD" <<'EOF'
import hashlib, sys
from pathlib import Path
mode, stamp, extras, pin, root = sys.argv[1:]
h = hashlib.sha256()
for f in ("pyproject.toml", "launch/constraints.txt"):
    h.update(Path(f).read_bytes())
h.update(f"\0torch=={pin}\0{root}".encode())
digest = h.hexdigest()
want = {e.strip() for e in extras.split(",") if e.strip()}
have, old = set(), ""
try:
    old, line = Path(stamp).read_text().splitlines()[:2]
    have = {e for e in line.split(",") if e}
except (OSError, ValueError):
    pass
if mode == "check":
    sys.exit(0 if old == digest and want <= have else 1)
keep = have if old == digest else set()
Path(stamp).write_text(f"{digest}\n{','.join(sorted(want | keep))}\n")
EOF
}
if [ -f "$stamp" ] && stamp_tool check; then
    exit 0
fi

bash launch/install_torch.sh "$py"
# The constraints with torch pinned to the version installed (MARSM_TORCH may differ from theirs).
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
grep -v '^torch==' launch/constraints.txt > "$constraints"
echo "torch==$pin" >> "$constraints"
spec="."
[ -n "$extras" ] && spec=".[$extras]"
echo "setup: installing marsm-dist${extras:+[$extras]} (editable)"
"$py" -m pip install -q --disable-pip-version-check -c "$constraints" -e "$spec"
stamp_tool write
