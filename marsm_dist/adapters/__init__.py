"""Framework adapters. Each translates its framework's shards into piece layouts and wires
MARSM into the framework's entry point; importing one registers it."""

from . import (
    fsdp2,  # noqa: F401  (FSDP2 ships with torch: always registered)
    hf,  # noqa: F401  (no transformers import: registers the Trainer-groups check)
)
