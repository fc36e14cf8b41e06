"""Checkpoints that move between frameworks and shapes.

* :func:`save_neutral` / :func:`load_neutral`: MARS-M's state as a DCP checkpoint keyed by
  parameter name, written and read shard by shard from any sharding (FSDP2, DDP, DeepSpeed
  ZeRO 0-3, Megatron, torchtitan, Lightning) into any other.
* ``python -m marsm_dist.checkpoint inspect PATH`` and ``convert SRC DST --to FORMAT``: the
  command line (``docs/checkpoints.md``).
"""

from .held import find_marsm, names_from_model
from .load import load_neutral
from .manifest import MANIFEST, read_manifest
from .neutral import save_neutral, state_key

__all__ = ["MANIFEST", "find_marsm", "load_neutral", "names_from_model", "read_manifest", "save_neutral",
           "state_key"]
