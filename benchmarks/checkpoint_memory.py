"""Peak memory of converting a checkpoint, for a Llama-3-8B-shaped MARS-M state on ``meta``.

    python benchmarks/checkpoint_memory.py [--model llama3-8b] [--world 8] [--stage 2]
                                           [--json benchmarks/results/checkpoint_memory.json]

The source is a DeepSpeed ZeRO checkpoint as :func:`marsm_dist.adapters.deepspeed_files.read_deepspeed`
sees it after memory-mapping the rank files: every rank's flat fp32 partitions of MARS-M's state
(``exp_avg``, ``last_grad`` on the matrices; ``exp_avg``, ``exp_avg_sq`` on the embedding, head and
norms) and master weights, here meta tensors made before measuring (a mapped file is not the
process's memory until read). Then each writer runs as ``convert`` runs it: the neutral form
(DCP, whose writer is replaced by one that resolves each item and drops it, in order, as DCP's
file writer does on the CPU) and the DeepSpeed universal layout (``torch.save`` of meta tensors to
a temporary directory). :class:`marsm_dist.diagnostics.PeakMemory` counts the bytes of every
storage created meanwhile; the bound is one parameter's full state (its largest sum over keys,
master weights included for the universal layout).
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import tempfile
import warnings
from collections import OrderedDict, namedtuple
from pathlib import Path

import torch
from torch.distributed.checkpoint.storage import StorageWriter, WriteResult
from torch.futures import Future

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results_file import save_results  # noqa: E402
from benchmarks.shapes import model_shapes  # noqa: E402
from marsm_dist.adapters.deepspeed_files import source_from_states, write_universal  # noqa: E402
from marsm_dist.checkpoint.convert import write_neutral  # noqa: E402
from marsm_dist.diagnostics import PeakMemory  # noqa: E402

Fragment = namedtuple("Fragment", "numel start")
GIB = 2**30


class DropWriter(StorageWriter):
    """A DCP storage writer that resolves every write item in order and keeps nothing."""

    def reset(self, checkpoint_id=None) -> None:
        pass

    def set_up_storage_writer(self, is_coordinator: bool, *args, **kwargs) -> None:
        pass

    def prepare_local_plan(self, plan):
        return plan

    def prepare_global_plan(self, plans):
        return plans

    def write_data(self, plan, planner):
        results = []
        for item in plan.items:
            data = planner.resolve_data(item)
            results.append(WriteResult(index=item.index, size_in_bytes=getattr(data, "nbytes", 0),
                                       storage_data=None))
            del data
        future: Future = Future()
        future.set_result(results)
        return future

    def finish(self, metadata, results) -> None:
        pass

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id) -> bool:
        return True


def zero_states(model: str, world: int) -> tuple[list[dict], list[OrderedDict]]:
    """ZeRO-1/2 rank files of MARS-M's state for ``model`` at ``world`` ranks, on meta: group 0 the
    matrices, group 1 the AdamW branch, each cut into ``world`` equal flat partitions."""
    matrices, others = model_shapes(model)
    names = [[f"m{i}" for i in range(len(matrices))], [f"a{i}" for i in range(len(others))]]
    shapes = [OrderedDict(zip(names[0], matrices, strict=True)),
              OrderedDict(zip(names[1], others, strict=True))]
    hyper = {"lr": 0.02, "weight_decay": 0.1, "momentum": 0.95, "gamma": 0.025, "ns_steps": 5,
             "ns_dtype": "bfloat16", "adamw_betas": (0.9, 0.95), "adamw_eps": 1e-8, "approx": True}
    sds = []
    for r in range(world):
        mappings, state, masters = [], {}, []
        for g, group in enumerate(shapes):
            total = sum(math.prod(s) for s in group.values())
            size = math.ceil(total / world)
            lo, hi, offset, mapping = r * size, (r + 1) * size, 0, OrderedDict()
            for name, shape in group.items():
                a, b = max(lo, offset), min(hi, offset + math.prod(shape))
                if a < b:
                    mapping[name] = Fragment(b - a, a - lo)
                offset += math.prod(shape)
            keys = ("exp_avg", "last_grad") if g == 0 else ("exp_avg", "exp_avg_sq")
            state[g] = {"step": torch.tensor(100.0), **{k: torch.empty(size, device="meta") for k in keys}}
            masters.append(torch.empty(size, device="meta"))
            mappings.append(mapping)
        groups = [{**hyper, "use_marsm": g == 0, "params": [g]} for g in range(2)]
        sds.append({"param_slice_mappings": mappings, "single_partition_of_fp32_groups": masters,
                    "base_optimizer_state": {"state": state, "param_groups": groups}, "zero_stage": 2})
    return sds, shapes


def measure(args: argparse.Namespace) -> list[dict]:
    sds, shapes = zero_states(args.model, args.world)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_file = Path(tmp) / "mp_rank_00_model_states.pt"
        torch.save({"param_shapes": shapes}, model_file)
        source = source_from_states(sds, shapes, "meta", dict(tag_dir=str(Path(tmp) / "global_step100"),
                                                             model_file=str(model_file)))
        state = [sum(4 * math.prod(p.shape) for _ in p.keys) for p in source.params]
        largest = max(4 * math.prod(p.shape) for p in source.params)
        for writer, bound in (("neutral", max(state)), ("deepspeed-universal",
                                                       max(s + 4 * math.prod(p.shape) for s, p in
                                                           zip(state, source.params, strict=True)))):
            with PeakMemory() as peak, warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if writer == "neutral":
                    write_neutral(source, Path(tmp), storage_writer=DropWriter())
                else:
                    write_universal(source, Path(tmp) / "universal")
            rows.append(dict(writer=writer, params=len(source.params), peak_gib=peak.peak / GIB,
                             largest_tensor_gib=largest / GIB, one_param_state_gib=bound / GIB,
                             ratio=peak.peak / bound, total_state_gib=sum(state) / GIB))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="llama3-8b")
    parser.add_argument("--world", type=int, default=8)
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/checkpoint_memory.json"))
    args = parser.parse_args()
    rows = measure(args)
    print(f"{args.model}, ZeRO-2 source at W={args.world}, meta tensors")
    print(f"{'writer':<20} {'params':>6} {'state GiB':>10} {'largest':>8} {'1 param':>8} {'peak GiB':>9} "
          f"{'ratio':>6}")
    for r in rows:
        print(f"{r['writer']:<20} {r['params']:>6} {r['total_state_gib']:>10.1f} "
              f"{r['largest_tensor_gib']:>8.2f} {r['one_param_state_gib']:>8.2f} {r['peak_gib']:>9.2f} "
              f"{r['ratio']:>6.2f}")
    machine = {"python": platform.python_version(), "torch": torch.__version__}
    save_results(args.json, f"{args.model}-w{args.world}", args, machine, rows)


if __name__ == "__main__":
    main()
