#!/usr/bin/env bash
# Print the extras the demo trainer needs for its arguments (launch/setup.sh's argument):
# "demo" (matplotlib), plus the framework's own with --framework deepspeed or megatron.
#   extras="$(bash launch/demo_extras.sh "$@")"
set -euo pipefail
framework=fsdp2
prev=""
for arg in "$@"; do
    case "$arg" in --framework=*) framework="${arg#--framework=}" ;; esac
    if [ "$prev" = --framework ]; then framework="$arg"; fi
    prev="$arg"
done
case "$framework" in
    deepspeed | megatron) echo "demo,$framework" ;;
    *) echo demo ;;
esac
