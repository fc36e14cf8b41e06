"""torchtitan 0.3: MARS-M chosen through torchtitan's optimizer config, on FSDP2 at 2 gloo ranks.

torchtitan's trainer needs an accelerator as shipped: ``tools/utils.py`` falls back to
``device_type = "cuda"`` (``Trainer.__init__`` then calls ``torch.cuda.set_device``), its model
package imports ``triton``, FlexAttention has no CPU backward and gloo has no ``PREMUL_SUM``. So:

* the real trainer runs through torchrun with stand-ins for those (``CPU_SHIM``): a job resumed
  from its checkpoint must reproduce the uninterrupted one;
* the pieces the trainer drives (``config.optimizer.build``, ``config.lr_scheduler.build``,
  gradient clipping, ``CheckpointManager`` with DCP) run in forked ranks with no stand-in at all,
  against an independent single-process ``MARSM``;
* torchtitan's ``ConfigManager`` parses the launch line's override and the recipe's registry.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.helpers.distributed import run_distributed

pytest.importorskip("torchtitan")

from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper  # noqa: E402
from torch.distributed.checkpoint.stateful import Stateful  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402
from torchtitan.components.checkpointer import CheckpointManager  # noqa: E402
from torchtitan.components.optimizer import LRSchedulersContainer, default_adamw  # noqa: E402
from torchtitan.distributed.utils import clip_grad_norm_  # noqa: E402

from marsm_dist import MARSM, param_groups  # noqa: E402
from marsm_dist.adapters.torchtitan import MARSMContainer, marsm  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
STEPS, SAVE_AT, BATCH, SEQ, VOCAB, DIM = 6, 3, 8, 6, 32, 16
MAX_NORM = 0.7  # training.max_norm (default 1.0): these gradients' norms are 0.66-0.75, so some steps clip
MATRICES = 8  # 4 hidden matrices per block, 2 blocks; embedding and lm_head take AdamW
SCHEDULE = LRSchedulersContainer.Config(warmup_steps=2, decay_ratio=0.5, decay_type="cosine",
                                        min_lr_factor=0.1)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention_norm, self.ffn_norm = nn.RMSNorm(DIM), nn.RMSNorm(DIM)
        self.attention = nn.ModuleDict({"wqkv": nn.Linear(DIM, 3 * DIM, bias=False),
                                        "wo": nn.Linear(DIM, DIM, bias=False)})
        # 37 rows split 19/18 over 2 ranks: an uneven shard
        self.feed_forward = nn.ModuleDict({"w1": nn.Linear(DIM, 37, bias=False),
                                           "w2": nn.Linear(37, DIM, bias=False)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.attention["wqkv"](self.attention_norm(x)).chunk(3, dim=-1)
        att = torch.softmax(q @ k.transpose(1, 2) / DIM**0.5, dim=-1) @ v
        x = x + self.attention["wo"](att)
        return x + self.feed_forward["w2"](torch.tanh(self.feed_forward["w1"](self.ffn_norm(x))))


class TinyLlama(nn.Module):
    """torchtitan's Llama parameter names (tok_embeddings, layers.N..., norm, lm_head), tiny."""

    def __init__(self) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleDict({str(i): Block() for i in range(2)})
        self.norm = nn.RMSNorm(DIM)
        self.lm_head = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, idx: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        x = self.tok_embeddings(idx)
        for layer in self.layers.values():
            x = layer(x)
        return nn.functional.cross_entropy(self.lm_head(self.norm(x)).flatten(0, 1), target.flatten())


def build(seed: int) -> TinyLlama:
    torch.manual_seed(seed)
    return TinyLlama()


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(step))
    return x[:, :-1], x[:, 1:]


def job_config() -> MARSMContainer.Config:
    # A real torchtitan optimizer config (what llama3's config_registry sets), turned into MARS-M
    # by the same override factory that --override.imports applies.
    return marsm(default_adamw(lr=0.02, weight_decay=0.1), ns_dtype="float32")


class TrainState(Stateful):
    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict:
        return {"step": torch.tensor(self.step)}

    def load_state_dict(self, sd: dict) -> None:
        self.step = int(sd["step"])


def trainer_parts(seed: int, world_size: int, folder: str, activation_checkpoint: bool):
    """What torchtitan's Trainer.__init__ builds after parallelizing: model, optimizers, lr
    schedulers, checkpointer (trainer.py: config.optimizer.build, lr_scheduler.build, checkpoint.build)."""
    model = build(seed)
    mesh = init_device_mesh("cpu", (world_size,))
    for name in list(model.layers):
        if activation_checkpoint:  # names gain "_checkpoint_wrapped_module"; checkpoints must not
            model.layers[name] = checkpoint_wrapper(model.layers[name])
        fully_shard(model.layers[name], mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizers = job_config().build(model_parts=[model])
    schedulers = SCHEDULE.build(optimizers=optimizers, training_steps=STEPS)
    state = TrainState()
    ckpt = CheckpointManager.Config(enable=True, folder="checkpoint", interval=SAVE_AT, keep_latest_k=0,
                                    last_save_model_only=False)
    checkpointer = ckpt.build(dataloader=None, model_parts=[model], optimizers=optimizers,
                              lr_schedulers=schedulers, states={"train_state": state}, sd_adapter=None,
                              base_folder=folder)
    return model, optimizers, schedulers, state, checkpointer


def train_step(model, optimizers, schedulers, state, rank, world_size) -> tuple[float, float]:
    """One step of torchtitan's train_step: zero_grad, forward/backward, its gradient clipping,
    optimizers.step, lr step. Grads are zeroed in place, as the trainer does by default
    (set_to_none=disable_cuda_graphs). Returns the mean loss and the gradient norm."""
    state.step += 1
    lo, hi = rank * BATCH // world_size, (rank + 1) * BATCH // world_size
    optimizers.zero_grad(set_to_none=False)
    x, y = batch(state.step)
    loss = model(x[lo:hi], y[lo:hi])
    loss.backward()
    grad_norm = clip_grad_norm_(list(model.parameters()), MAX_NORM, foreach=True)
    optimizers.step()
    schedulers.step()
    total = loss.detach().clone()
    torch.distributed.all_reduce(total)
    return total.item() / world_size, grad_norm.item()  # torchtitan returns the full norm


def full_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n.replace("_checkpoint_wrapped_module.", ""): p.full_tensor().detach().clone()
            for n, p in model.named_parameters()}


def save_and_resume_run(rank: int, world_size: int, folder: str) -> dict:
    torch.distributed.barrier()
    # Run A: uninterrupted, with activation checkpointing; torchtitan checkpoints at step SAVE_AT.
    model, opt, sched, state, ckpt = trainer_parts(0, world_size, folder, activation_checkpoint=True)
    flat = opt.state_dict()  # before any step, as a load at startup would call it
    fresh_steps = {k: float(v) for k, v in flat.items() if k.endswith(".step")}
    keys = sorted(flat)
    placements = {k: str(v.placements) for k, v in flat.items() if isinstance(v, DTensor)}
    losses, norms, stats = [], [], []
    while state.step < STEPS:
        loss, norm = train_step(model, opt, sched, state, rank, world_size)
        losses.append(loss)
        norms.append(norm)
        stats.append(opt.optimizers[0].last_step_stats)
        ckpt.save(curr_step=state.step)
    uninterrupted = full_params(model)
    ckpt.close()
    torch.distributed.barrier()
    # Run B: another initialization, no activation checkpointing; resumes from the checkpoint.
    model, opt, sched, state, ckpt = trainer_parts(1, world_size, folder, activation_checkpoint=False)
    ckpt.load(step=SAVE_AT)
    loaded_step = state.step
    resumed = []
    while state.step < STEPS:
        resumed.append(train_step(model, opt, sched, state, rank, world_size)[0])
    ckpt.close()
    return {"keys": keys, "fresh_steps": fresh_steps, "placements": placements, "losses": losses,
            "norms": norms, "stats": stats, "uninterrupted": uninterrupted, "loaded_step": loaded_step,
            "resumed_losses": resumed, "resumed": full_params(model)}


def reference() -> tuple[list[float], dict[str, torch.Tensor]]:
    """A single-process MARSM on the unsharded model and the full batches, under the same
    torchtitan lr schedule: what the sharded run must reproduce."""
    model = build(0)
    opt = MARSM(param_groups(model), lr=0.02, weight_decay=0.1, adamw_betas=(0.9, 0.95), adamw_eps=1e-8,
                ns_dtype="float32")
    sched = SCHEDULE.build(optimizers=[opt], training_steps=STEPS)
    losses = []
    for step in range(1, STEPS + 1):
        opt.zero_grad()
        loss = model(*batch(step))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}


def test_fsdp2_steps_match_single_process_and_checkpoint_resumes_exactly(tmp_path):
    results = run_distributed(save_and_resume_run, 2, str(tmp_path), timeout=120)
    want_losses, want = reference()
    for r in results:
        # The same checkpoint keys on both ranks; MARS-M state sharded like its parameter; no
        # dummy step ran when torchtitan read the state before the first step.
        assert r["keys"] == results[0]["keys"]
        assert "state.layers.0.attention.wqkv.weight.last_grad" in r["keys"]
        assert "state.tok_embeddings.weight.exp_avg_sq" in r["keys"]
        assert not any("_checkpoint_wrapped_module" in k for k in r["keys"])
        assert r["placements"]["state.layers.1.feed_forward.w1.weight.exp_avg"] == "(Shard(dim=0),)"
        assert set(r["fresh_steps"].values()) == {0.0}
        assert min(r["norms"]) < MAX_NORM < max(r["norms"])  # the trainer's clipping engaged on some steps
        # Against the independent single-process reference.
        assert max(abs(a - b) for a, b in zip(r["losses"], want_losses, strict=True)) < 1e-5
        assert max((r["uninterrupted"][n] - want[n]).abs().max().item() for n in want) < 1e-5
        # The sharded path engaged: every matrix has one owner, and shards travelled.
        assert all(s.bytes_sent > 0 for s in r["stats"])
        # Resume: the step restored, then the very same trajectory (lr schedule included).
        assert r["loaded_step"] == SAVE_AT
        assert r["resumed_losses"] == r["losses"][SAVE_AT:]
        for n in want:
            assert torch.equal(r["resumed"][n], r["uninterrupted"][n]), n
    assert sum(r["stats"][-1].owned_matrices for r in results) == MATRICES
    assert (tmp_path / "checkpoint" / f"step-{SAVE_AT}" / ".metadata").exists()


# torchtitan's trainer and model package on a CPU-only torch need stand-ins for what only an
# accelerator build has. Written as ``sitecustomize`` into a folder put first on PYTHONPATH, so
# every torchrun worker applies them before torchtitan is imported. Each one is a no-op where the
# real thing exists (a GPU machine with triton): none touches MARSM or the glue under test.
CPU_SHIM = textwrap.dedent("""
    import sys, types
    import torch, torch._utils, torch.cpu, torch.distributed as dist
    try:
        import triton  # noqa: F401
    except ImportError:  # MoE expert-parallel kernels (unused by a dense Llama) import triton
        stub = types.ModuleType("torchtitan.distributed.minimal_async_ep.kernels")
        stub.__getattr__ = lambda name: None
        sys.modules[stub.__name__] = stub
    if torch._utils._get_available_device_type() is None:
        # tools/utils.py falls back to "cuda"; Trainer.__init__ then calls torch.cuda.set_device.
        torch._utils._get_available_device_type = lambda: "cpu"
        for name, fn in {"get_device_name": lambda *a: "cpu", "empty_cache": lambda *a: None,
                         "get_device_properties": lambda *a: types.SimpleNamespace(total_memory=2**36),
                         "reset_peak_memory_stats": lambda *a: None, "memory_stats": lambda *a: {},
                         }.items():
            setattr(torch.cpu, name, getattr(torch.cpu, name, fn))
        torch.cpu.current_device = lambda: 0  # torchtitan passes it to barrier(device_ids=[...])
        # FlexAttention refuses backward on CPU; run eagerly (TORCHDYNAMO_DISABLE=1) it is dense math.
        import torch.nn.attention.flex_attention as flex
        flex._validate_device = lambda *a, **k: None
        # gloo has no PREMUL_SUM, which FSDP2 uses for torchtitan's divide factor 1.0: SUM + divide.
        import torch.distributed.fsdp._fully_shard._fsdp_collectives as coll
        factors = coll._get_gradient_divide_factors
        coll._get_gradient_divide_factors = lambda rs, ar, dt, dev="", f=None, force=False: factors(
            rs, ar, dt, dev, f, True)
        if not hasattr(dist, "set_timeout"):  # absent from the CPU build
            dist.set_timeout = lambda *a, **k: None
""")


def cpu_env(tmp: Path) -> dict[str, str]:
    shim = tmp / "shim"
    shim.mkdir(exist_ok=True)
    (shim / "sitecustomize.py").write_text(CPU_SHIM)
    path = os.pathsep.join(p for p in (str(shim), str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "TORCHDYNAMO_DISABLE": "1"}


CONFIG_SCRIPT = textwrap.dedent("""
    import json
    import torch
    from torchtitan.config import ConfigManager
    from torchtitan.config.override import apply_overrides
    out = {}
    cfg = ConfigManager().parse_args(["--module", "llama3", "--config", "llama3_debugmodel",
        "--override.imports", 'marsm_dist.adapters.torchtitan.marsm={"gamma": 0.05, "ns_dtype": "float32"}'])
    apply_overrides(cfg.override, cfg)  # what Trainer.__init__ does before building anything
    o = cfg.optimizer
    out["override"] = [type(o).__qualname__, o.lr, o.weight_decay, list(o.adamw_betas), o.adamw_eps, o.gamma]
    with torch.device("meta"):
        model = cfg.model_spec.model.build()
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.init_weights(buffer_device=None)
    opt = o.build(model_parts=[model])
    out["groups"] = [[g["use_marsm"], len(g["params"])] for g in opt.optimizers[0].param_groups]
    # Plain (unsharded) parameters too: the state exists, so torchtitan's read ran no dummy step.
    out["fresh_steps"] = sorted({float(v) for k, v in opt.state_dict().items() if k.endswith(".step")})
    cfg = ConfigManager().parse_args(["--module", "integrations.torchtitan", "--config",
                                      "llama3_debugmodel_marsm", "--optimizer.gamma", "0.07"])
    out["registry"] = [type(cfg.optimizer).__qualname__, cfg.optimizer.lr, cfg.optimizer.gamma]
    print("RESULT " + json.dumps(out))
""")


def test_config_selects_marsm_by_override_and_by_the_recipe_registry(tmp_path):
    """The user's change, parsed by torchtitan's own ConfigManager: ``--override.imports ...marsm``
    on the stock llama3 debug config, and the recipe's config_registry (with a CLI field)."""
    proc = subprocess.run([sys.executable, "-c", CONFIG_SCRIPT], cwd=ROOT, env=cpu_env(tmp_path),
                          capture_output=True, text=True, timeout=120)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT "):])
    assert out["override"] == ["MARSMContainer.Config", 8e-4, 0.1, [0.9, 0.95], 1e-8, 0.05]
    assert out["groups"] == [[True, 30], [False, 15]]  # 5 matrices x 6 layers; embeddings, head, norms
    assert out["fresh_steps"] == [0.0]
    assert out["registry"] == ["MARSMContainer.Config", 6e-3, 0.07]


def write_assets(tmp: Path) -> None:
    """A character-level tokenizer and a small text corpus in the formats torchtitan loads
    (its own test assets ship with its repository, not its wheel)."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    special = ["<|begin_of_text|>", "<|end_of_text|>"]
    vocab = {t: i for i, t in enumerate(special + [chr(c) for c in range(32, 127)])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=special[1]))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.add_special_tokens([AddedToken(t, special=True) for t in special])
    (tmp / "tokenizer").mkdir()
    tok.save(str(tmp / "tokenizer" / "tokenizer.json"))
    (tmp / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": special[0], "eos_token": special[1], "add_bos_token": True, "add_eos_token": True}))
    words = "the quick brown fox jumps over a lazy dog while momentum orthogonalizes matrices".split()
    gen = torch.Generator().manual_seed(0)
    (tmp / "data").mkdir()
    with open(tmp / "data" / "train.json", "w") as f:
        for _ in range(300):
            idx = torch.randint(0, len(words), (60,), generator=gen).tolist()
            f.write(json.dumps({"text": " ".join(words[i] for i in idx)}) + "\n")


def torchtitan_train(tmp: Path, out: str) -> tuple[dict[int, str], str]:
    """``torchrun -m torchtitan.train`` at 2 ranks (gloo) with the launch line's one change;
    returns rank 0's loss per step (as torchtitan prints it) and its log."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--local-ranks-filter", "0", "-m", "torchtitan.train", "--module", "llama3",
           "--config", "llama3_debugmodel",
           "--override.imports", 'marsm_dist.adapters.torchtitan.marsm={"ns_dtype": "float32"}',
           "--training.steps", str(STEPS), "--training.seq_len", "64", "--training.local_batch_size", "2",
           "--training.disable_cuda_graphs", "--validator.no-enable", "--debug.seed", "0",
           # The default spmd_types backend fails on a CPU before any optimizer is built
           # ("all parameters must be DTensors on the full SPMD mesh"): classic FSDP2 here.
           "--parallelism.spmd_backend", "partial_dtensor",
           "--checkpoint.enable", "--checkpoint.interval", str(SAVE_AT),
           "--hf_assets_path", str(tmp / "tokenizer"), "--dataloader.dataset_path", str(tmp / "data"),
           "--dump_folder", str(tmp / out)]
    proc = subprocess.run(cmd, cwd=tmp, env=cpu_env(tmp), capture_output=True, text=True, timeout=180)
    log = re.sub(r"\x1b\[[0-9;]*m", "", proc.stdout + proc.stderr)
    assert proc.returncode == 0, log[-4000:]
    return {int(m[1]): m[2] for m in re.finditer(r"step:\s+(\d+)\s+loss:\s+(\S+)", log)}, log


def test_torchtitan_trainer_resumes_marsm_exactly(tmp_path):
    """torchtitan's real trainer (CPU stand-ins above): Llama-3 debug model, FSDP2 at 2 ranks,
    MARS-M chosen by --override.imports. A job checkpointed at step 3 and restarted from that
    checkpoint prints the uninterrupted job's losses, and its final checkpoint (model, MARS-M
    state, lr scheduler, dataloader) equals the uninterrupted one's bit for bit."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    write_assets(tmp_path)
    losses, log = torchtitan_train(tmp_path, "uninterrupted")
    assert "[Override] marsm_dist.adapters.torchtitan.marsm" in log
    assert "MARSM (model part 0): 30 params, use_marsm=True" in log
    shown = re.search(r"MARS-M step 1 on this rank: orthogonalized (\d+) of 30 sharded matrices, "
                      r"sent (\S+) MB", log)
    assert shown and 0 < int(shown[1]) < 30 and float(shown[2]) > 0  # rank 0's share of a sharded step
    assert sorted(losses) == list(range(1, STEPS + 1)) and float(losses[STEPS]) < float(losses[1])
    # The restarted job: a fresh dump folder holding only the step-3 checkpoint.
    first = tmp_path / "uninterrupted" / "checkpoint"
    shutil.copytree(first / f"step-{SAVE_AT}", tmp_path / "resumed" / "checkpoint" / f"step-{SAVE_AT}")
    resumed, log = torchtitan_train(tmp_path, "resumed")
    assert "Loading the checkpoint" in log
    assert resumed == {s: losses[s] for s in range(SAVE_AT + 1, STEPS + 1)}
    final = []
    for run in ("uninterrupted", "resumed"):
        dcp_to_torch_save(tmp_path / run / "checkpoint" / f"step-{STEPS}", tmp_path / f"{run}.pt")
        final.append(torch.load(tmp_path / f"{run}.pt", weights_only=False))
    optim = final[0]["optimizer"]
    assert "state.layers.0.attention.wo.weight.last_grad" in optim  # MARS-M's own state was saved
    assert float(optim["state.layers.0.attention.wo.weight.step"]) == STEPS
    assert_same(final[0], final[1])


def assert_same(a, b, path: str = "") -> None:
    assert type(a) is type(b), path
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    else:
        assert a == b, path


def test_config_refuses_torchtitan_param_groups():
    cfg = MARSMContainer.Config(param_groups=default_adamw().param_groups)
    with pytest.raises(ValueError, match="leave param_groups empty"):
        cfg.build(model_parts=[build(0)])


def test_the_container_exports_and_imports_the_neutral_form(tmp_path):
    """``save_neutral(container, ...)`` reaches the one part's MARSM; names are torchtitan's FQNs."""
    from marsm_dist.checkpoint import load_neutral, save_neutral

    model = build(0)
    optimizers = job_config().build(model_parts=[model])
    for step in range(2):
        x, y = batch(step)
        model(x, y).backward()
        optimizers.step()
        optimizers.zero_grad()
    manifest = save_neutral(optimizers, tmp_path / "neutral")
    assert {e["step"] for e in manifest["params"].values()} == {2.0}
    twin = build(1)
    twin_optimizers = job_config().build(model_parts=[twin])
    load_neutral(twin_optimizers, tmp_path / "neutral")
    (mine,), (theirs,) = optimizers.optimizers, twin_optimizers.optimizers
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        for key, value in mine.state[p].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(theirs.state[q][key])), key
