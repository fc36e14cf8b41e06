"""DeepSpeed's ZeRO checkpoint files, read offline one parameter at a time, and written as a
DeepSpeed *universal* checkpoint that carries MARS-M's state.

A ZeRO-1/2 checkpoint holds, per data-parallel rank, each param group's flat fp32 partition and
MARSM's state of it (``exp_avg``, ``last_grad`` or ``exp_avg_sq``, ``step``), with the range each
parameter takes in it (``param_slice_mappings``). A ZeRO-3 checkpoint holds per rank each
sub-group's partition: every parameter cut in ``ceil(numel / W)`` chunks, in ``param_shapes``
order. :func:`read_deepspeed` describes either as a :class:`~marsm_dist.checkpoint.sources.Source`
whose loaders join one parameter's pieces (the files are memory-mapped, so nothing else is read).

DeepSpeed's own ``ds_to_universal`` stops on MARS-M's state (it names Adam's ``exp_avg_sq``,
DeepSpeed issue #8608); :func:`write_universal` writes the same layout with every state key:
``zero/<name>/<key>.pt`` = ``{"param": full tensor, "cat_dim": 0}``, ``zero/<name>/step.pt``,
``zero/optimizer_state.pt`` and the model-states file under both names ZeRO-1/2 and ZeRO-3 look
for. ZeRO-1/2 engines load it as it is; ZeRO-3's loader reads only Adam's names, so
:mod:`.deepspeed_checkpoint` gives it one that reads every key (installed with the adapter).
"""

from __future__ import annotations

import math
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..checkpoint.convert import register_writer
from ..checkpoint.held import BRANCH_KEYS
from ..checkpoint.sources import Source, SourceParam, register_source
from ..options import SAVED_GROUP_KEYS

__all__ = ["is_deepspeed_checkpoint", "read_deepspeed", "register", "source_from_states", "write_universal"]

_RANK = re.compile(r"zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")


def _tag_dir(path: Path) -> Path:
    """The directory holding one checkpoint's files: ``path`` itself, or the tag ``latest`` names."""
    if (path / "latest").is_file() and not list(path.glob("*optim_states.pt")):
        return path / (path / "latest").read_text().strip()
    return path


def is_deepspeed_checkpoint(path: Path) -> bool:
    """True for a DeepSpeed checkpoint directory (the root with ``latest``, or one tag's)."""
    return path.is_dir() and bool(list(_tag_dir(path).glob("*zero_pp_rank_*_optim_states.pt")))


def _load(file: Path) -> Any:
    # Memory-mapped: a parameter's pieces are read when its loader runs, not when the file opens.
    return torch.load(file, map_location="cpu", mmap=True, weights_only=False)


def _pieces(sds: list[dict], shapes: list[dict], stage3: bool) -> dict[str, list[tuple[int, int, int, int]]]:
    """Parameter name -> its (rank, group, start, numel) pieces, in rank order."""
    pieces: dict[str, list[tuple[int, int, int, int]]] = {}
    world = len(sds)
    for r, sd in enumerate(sds):
        if not stage3:
            for g, mapping in enumerate(sd["param_slice_mappings"]):
                for name, frag in mapping.items():
                    pieces.setdefault(name, []).append((r, g, frag.start, frag.numel))
            continue
        for g, group_shapes in enumerate(shapes):
            offset = 0
            for name, shape in group_shapes.items():
                n = math.prod(shape)
                chunk = math.ceil(n / world)
                held = max(0, min(chunk, n - r * chunk))
                pieces.setdefault(name, [])
                if held:
                    pieces[name].append((r, g, offset, held))
                offset += chunk
    return pieces


def _joined(flats: Callable[[int, int], torch.Tensor], pieces, shape) -> Callable[[], torch.Tensor]:
    def load() -> torch.Tensor:
        return torch.cat([flats(r, g).narrow(0, start, n) for r, g, start, n in pieces]).view(shape)
    return load


def read_deepspeed(path: Path) -> Source:
    """A DeepSpeed ZeRO-1/2/3 checkpoint of a MARS-M run as a Source (ValueError for another
    optimizer's: its param groups lack MARS-M's keys)."""
    tag = _tag_dir(Path(path))
    files = sorted(tag.glob("*zero_pp_rank_*_optim_states.pt"), key=lambda f: int(_RANK.search(f.name)[1]))
    model_file = sorted(tag.glob("*model_states.pt"))[0]
    sds = [_load(f)["optimizer_state_dict"] for f in files]
    model_states = _load(model_file)
    return source_from_states(sds, model_states["param_shapes"], str(path),
                              dict(tag_dir=str(tag), model_file=str(model_file),
                                   ds_version=model_states.get("ds_version")))


def _check_ranks(sds: list[dict], path: str) -> None:
    """Every rank's file is there: at least as many as the largest partition count recorded (a
    MoE group's may be smaller: it is cut over the expert-data-parallel ranks)."""
    counts = []
    for sd in sds:
        count = sd.get("partition_count")
        counts += count if isinstance(count, list) else [count] if count is not None else []
    if counts and max(counts) > len(sds):
        raise ValueError(f"{path}: {len(sds)} rank files (zero_pp_rank_*_optim_states.pt), but the "
                         f"checkpoint was written by {max(counts)} ranks: a rank's file is missing")


def source_from_states(sds: list[dict], shapes: list[dict], path: str, extra: dict[str, Any]) -> Source:
    """The Source of every rank's ``optimizer_state_dict`` (ZeRO-1/2's or ZeRO-3's, in rank order)
    and the model's ``param_shapes``; each loader joins one state tensor of one parameter."""
    stage3 = "fp32_flat_groups" in sds[0]
    _check_ranks(sds, path)
    bases = [sd["optimizer_state_dict" if stage3 else "base_optimizer_state"] for sd in sds]
    groups = bases[0]["param_groups"]
    missing = [k for k in SAVED_GROUP_KEYS if k not in groups[0]]
    if missing:
        raise ValueError(f"{path} is not a MARS-M checkpoint: its param groups have no {missing} (keys "
                         f"{sorted(k for k in groups[0] if k != 'params')}: another optimizer's state)")
    shape_of = {n: tuple(s) for g in shapes for n, s in g.items()}
    masters = [sd["fp32_flat_groups" if stage3 else "single_partition_of_fp32_groups"] for sd in sds]
    params = []
    for name, pieces in _pieces(sds, shapes, stage3).items():
        held, numel = sum(n for *_, n in pieces), math.prod(shape_of[name])
        if held != numel:
            raise ValueError(f"{path}: the partitions hold {held} of the {numel} elements of {name!r}: "
                             f"a rank's file is missing or damaged")
        g = pieces[0][1] if pieces else 0
        state = bases[0]["state"].get(g, {})
        branch = "marsm" if "last_grad" in state else "adamw"
        hyper = {k: v for k, v in groups[min(g, len(groups) - 1)].items() if k != "params"}
        keys = {k: (state[k].dtype, _joined(lambda r, g, k=k: bases[r]["state"][g][k], pieces,
                                            shape_of[name])) for k in BRANCH_KEYS[branch] if k in state}
        master = (torch.float32, _joined(lambda r, g: masters[r][g], pieces, shape_of[name]))
        step = float(state["step"]) if "step" in state else 0.0
        params.append(SourceParam(name, shape_of[name], branch, step, hyper, keys, master=master))
    kept = ("loss_scaler", "dynamic_loss_scale", "overflow", "clip_grad", "ds_version")
    extra = dict(extra, stage=3 if stage3 else int(sds[0].get("zero_stage", 2)), groups=groups,
                 global_state={k: sds[0][k] for k in kept if k in sds[0]})
    # ZeRO-3's files keep the version in the model states only; DeepSpeed's loader asks for it.
    extra["global_state"].setdefault("ds_version", extra.pop("ds_version", None))
    return Source(path, "deepspeed", f"deepspeed ZeRO-{extra['stage']}", len(sds), params, extra=extra)


def write_universal(source: Source, dst: str | os.PathLike, tag: str | None = None,
                    progress: Callable[[str], None] | None = None) -> Path:
    """Write ``source`` (a DeepSpeed checkpoint: the model-states file and master weights come
    from it) as a universal checkpoint under ``dst`` (``dst/latest_universal`` names the tag)."""
    if source.format != "deepspeed":
        raise ValueError(f"a DeepSpeed universal checkpoint needs DeepSpeed's model-states file and fp32 "
                         f"master weights; {source.path} is a {source.format} checkpoint. Load it into the "
                         f"DeepSpeed engine with marsm_dist.checkpoint.load_neutral after initialize")
    tag = tag or Path(source.extra["tag_dir"]).name + "_universal"
    out = Path(dst) / tag
    zero = out / "zero"
    for p in source.params:
        folder = zero / p.name
        folder.mkdir(parents=True, exist_ok=True)
        for key, (_, load) in [("fp32", source_master(p)), *p.keys.items()]:
            torch.save({"param": _own_storage(load()), "cat_dim": 0}, folder / f"{key}.pt")
        torch.save(torch.tensor(p.step, dtype=torch.float32), folder / "step.pt")
        if progress is not None:
            progress(p.name)
    step0 = source.params[0].step if source.params else 0.0
    optim_state = {**source.extra["global_state"], "param_groups": source.extra["groups"]}
    optim_state.setdefault("clip_grad", 0.0)
    # ZeRO-3's own loader reads the step and the hyperparameters from here.
    optim_state["optimizer_state_dict"] = {"state": {0: {"step": torch.tensor(step0)}},
                                           "param_groups": source.extra["groups"]}
    torch.save(optim_state, zero / "optimizer_state.pt")
    mp = re.search(r"mp_rank_(\d+)_model_states", Path(source.extra["model_file"]).name)[1]
    for name in (f"mp_rank_{mp}_model_states.pt", f"zero_pp_rank_0_mp_rank_{mp}_model_states.pt"):
        shutil.copy2(source.extra["model_file"], out / name)  # ZeRO-1/2 and ZeRO-3 engines look for each
    (Path(dst) / "latest_universal").write_text(tag)
    return out


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    # torch.save writes a view's whole storage: a view into a bigger buffer is copied first.
    return t if t.untyped_storage().nbytes() == t.nbytes else t.clone()


def source_master(p: SourceParam) -> tuple[torch.dtype, Callable[[], torch.Tensor]]:
    if p.master is None:
        raise ValueError(f"{p.name}: no fp32 master weights in the source")
    return p.master


def register() -> None:
    """Let ``marsm_dist.checkpoint`` read DeepSpeed checkpoints and write universal ones (idempotent)."""
    register_source("deepspeed", is_deepspeed_checkpoint, read_deepspeed)
    register_writer("deepspeed-universal", lambda source, dst, progress: write_universal(source, dst,
                                                                                          progress=progress))
