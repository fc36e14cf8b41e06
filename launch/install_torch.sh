#!/usr/bin/env bash
# Install torch==$MARSM_TORCH (default 2.13.0) into the Python environment of PYTHON, the way a
# user should: on its own and first, so that no other package's requirements pick the build.
#
#   bash launch/install_torch.sh PYTHON
#
# Which build:
# - a machine with an NVIDIA GPU (`nvidia-smi -L` works, or /proc/driver/nvidia exists) gets
#   pip's default build (on Linux x86-64 from PyPI: the CUDA one);
# - a machine without one gets the CPU build from PyTorch's own CPU wheel index
#   (https://download.pytorch.org/whl/cpu, about 190 MB instead of several GB of CUDA libraries).
#   Where that index cannot be reached (checked first, 5 s at most) it falls back to pip's
#   default index, and says so: from PyPI on Linux x86-64 that is the multi-GB CUDA build.
# MARSM_TORCH_INDEX=URL installs from that index instead (e.g. a CUDA-version index or a mirror);
# MARSM_TORCH_INDEX=default always uses pip's configured index.
# Nothing is installed when the environment already has that torch version (any local label:
# 2.13.0+cpu counts as 2.13.0).
set -euo pipefail
py="${1:?usage: install_torch.sh PYTHON}"
pin="${MARSM_TORCH:-2.13.0}"
cpu_index="https://download.pytorch.org/whl/cpu"

installed="$("$py" -c "import importlib.metadata as m; print(m.version('torch').split('+')[0])" 2>/dev/null || true)"
if [ "$installed" = "$pin" ]; then
    exit 0
fi

has_nvidia_gpu() {
    [ -e /proc/driver/nvidia ] && return 0
    command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1
}

# Answers within 5 s (a blocked host takes the timeout, an unknown one fails at once).
reachable() {
    "$py" - "$1" <<'EOF' >/dev/null 2>&1
import sys
import urllib.error
import urllib.request
url = sys.argv[1].rstrip("/") + "/torch/"
try:
    urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=5)
except urllib.error.HTTPError as err:  # a server that does not take HEAD: ask for a byte
    if err.code not in (405, 501):
        raise
    urllib.request.urlopen(url, timeout=5).read(1)
EOF
}

index_args=()
if [ -n "${MARSM_TORCH_INDEX:-}" ]; then
    if [ "$MARSM_TORCH_INDEX" != default ]; then
        index_args=(--index-url "$MARSM_TORCH_INDEX")
    fi
    where="${MARSM_TORCH_INDEX} (MARSM_TORCH_INDEX)"
elif has_nvidia_gpu; then
    where="pip's default index (NVIDIA GPU found: the default, CUDA, build)"
elif reachable "$cpu_index"; then
    index_args=(--index-url "$cpu_index")
    where="$cpu_index (no NVIDIA GPU: the CPU build)"
else
    where="pip's default index: $cpu_index is not reachable from here. From PyPI on Linux x86-64 this
         is the CUDA build (several GB); set MARSM_TORCH_INDEX to a CPU wheel index or mirror to avoid it"
fi
echo "install_torch: torch==$pin from $where"
"$py" -m pip install -q --disable-pip-version-check ${index_args[@]+"${index_args[@]}"} "torch==$pin"
