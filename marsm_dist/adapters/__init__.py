"""Framework adapters. Each translates its framework's shards into piece layouts and wires MARSM
into the framework's entry point.

Importing this package imports no framework and registers nothing: the sharding registry
(:mod:`marsm_dist.sharding.adapter`) loads the FSDP2 and Megatron-TP adapters itself when a lookup
needs them, and each framework's entry point registers its own (``import
marsm_dist.adapters.deepspeed``, Megatron's builder, the Trainer check of
:mod:`marsm_dist.adapters.hf`).
"""
