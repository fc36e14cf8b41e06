"""What the tests share; no test module imports another.

- ``distributed``: run a function on W gloo ranks in forked processes (``run_distributed``), or
  as one rank of a larger world on the meta device (``run_with_fake_group``); ``free_port``.
- ``launch_env``: the environment for tests that start launch scripts, recipes and the demo.
- ``reference_marsm``: the independent re-implementation of the spec the optimizer must match.
- ``problem``: the single-process problem (every parameter kind, three group styles, an LR
  schedule); ``optimizer_runs``: short runs on it and exact run-to-run comparisons.
- ``fsdp2_models``: models, data and sharding recipes for the FSDP2/topology tests.
- ``megatron_gpt``, ``megatron_cpu_shim``, ``megatron_cpu_site/``: megatron-core's GPT on CPU.
- ``demo_runs``: the demo tests' tiny flags and summary checks; ``resume_worker``: a process
  that trains, saves and resumes; ``hf_cpu_run``: the HF recipes on CPU ranks.
"""
