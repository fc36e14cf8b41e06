"""Run an ``integrations/hf`` recipe on CPU ranks through the framework's real distributed path.

    torchrun --standalone --nproc_per_node 2 tests/helpers/hf_cpu_run.py SCRIPT [ARGS...]

On a machine without GPUs, Accelerate gives a torchrun job ``DistributedType.NO`` (each process
thinks it is alone) unless the Trainer runs with ``use_cpu=True``, which turns FSDP and DeepSpeed
off. This runner sets the minimum for their real code paths to run on gloo, and nothing in
marsm_dist: it builds Accelerate's process state first (``PartialState(cpu=True,
backend="gloo")``) with the distributed type the GPU run would get (``MULTI_GPU``, which
Accelerate turns into FSDP, or ``DEEPSPEED``; ``HF_CPU_DISTRIBUTED_TYPE``), and makes every
``TrainingArguments`` reuse that state (``accelerator_config={"use_configured_state": True}``).
The recipe itself runs unchanged.
"""

from __future__ import annotations

import os
import runpy
import sys

import transformers
from accelerate import PartialState
from accelerate.utils import DistributedType


def _reuse_configured_state() -> None:
    post_init = transformers.TrainingArguments.__post_init__

    def patched(self) -> None:
        config = self.accelerator_config or {}
        if not isinstance(config, dict):
            raise TypeError(f"hf_cpu_run: expected accelerator_config as a dict, got {type(config)}")
        self.accelerator_config = {**config, "use_configured_state": True}
        post_init(self)

    transformers.TrainingArguments.__post_init__ = patched


def main() -> None:
    state = PartialState(cpu=True, backend="gloo")
    state.distributed_type = DistributedType[os.environ.get("HF_CPU_DISTRIBUTED_TYPE", "MULTI_GPU")]
    _reuse_configured_state()
    script = os.path.abspath(sys.argv[1])
    sys.argv = sys.argv[1:]
    sys.path.insert(0, os.path.dirname(script))  # as `python SCRIPT` would: the recipe's own folder
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
