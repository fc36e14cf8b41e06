"""Test-only shim: lets megatron-core 0.16.1 code paths that hard-code CUDA run on CPU (gloo).

Usage:  with cuda_shim.CpuCudaShim(): ...     or   shim = cuda_shim.install(); ...; shim.uninstall()
fake_cuda_type=True additionally makes Tensor.type() (no args) report 'torch.cuda.*Tensor' for CPU
tensors (needed by Float16OptimizerWithFloat16Params / clip_grads type asserts).
device="meta" sends the redirected calls to the meta device instead: it stands in for the GPU in
tests whose process group, like NCCL, serves that device only (torch's "meta:fake" backend).
"""
import contextlib

import torch
from torch.overrides import TorchFunctionMode


def _cpu(d, target="cpu"):
    if isinstance(d, int) or (isinstance(d, (str, torch.device)) and str(d).startswith("cuda")):
        return torch.device(target)
    return d


class _CpuDeviceMode(TorchFunctionMode):
    """Rewrites device='cuda'/int/cuda:N to the target (cpu); Tensor.cuda() and .to('cuda') go there too."""
    def __init__(self, target="cpu"):
        super().__init__()
        self.target = target

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0] if self.target == "cpu" else args[0].to(self.target)
        if "device" in kwargs:
            kwargs["device"] = _cpu(kwargs["device"], self.target)
        if func is torch.Tensor.to and len(args) > 1 and isinstance(args[1], (str, torch.device, int)):
            args = (args[0], _cpu(args[1], self.target)) + tuple(args[2:])
        return func(*args, **kwargs)


class _FakeStream:
    def __init__(self, *a, **k): pass
    def wait_stream(self, *a, **k): pass
    def synchronize(self): pass
    def record_event(self, *a, **k): return None


class CpuCudaShim(contextlib.AbstractContextManager):
    def __init__(self, fake_cuda_type=False, device="cpu"):
        self.fake_cuda_type, self.device, self._saved, self._mode = fake_cuda_type, device, [], None

    def _set(self, obj, name, val):
        self._saved.append((obj, name, getattr(obj, name)))
        setattr(obj, name, val)

    def install(self):
        import megatron.core.tensor_parallel.random as mrand
        c = torch.cuda
        self._set(c, "current_device", lambda: self.device)
        self._set(c, "synchronize", lambda *a, **k: None)
        self._set(c, "get_rng_state", lambda *a, **k: torch.get_rng_state())
        self._set(c, "set_rng_state", lambda s, *a, **k: torch.set_rng_state(s))
        self._set(c, "manual_seed", lambda s: torch.manual_seed(s))
        self._set(c, "Stream", _FakeStream)
        self._set(c, "stream", lambda *a, **k: contextlib.nullcontext())
        self._set(c, "current_stream", lambda *a, **k: _FakeStream())
        self._set(c, "default_stream", lambda *a, **k: _FakeStream())
        self._set(mrand, "_get_cuda_rng_state", lambda *a, **k: torch.get_rng_state())
        self._set(mrand, "_set_cuda_rng_state", lambda s, *a, **k: torch.set_rng_state(s))
        if self.fake_cuda_type:
            orig = torch.Tensor.type
            def _type(t, *a, **k):
                r = orig(t, *a, **k)
                plain = not a and not k and t.device.type == "cpu" and "cuda" not in r
                return r.replace("torch.", "torch.cuda.", 1) if plain else r
            self._set(torch.Tensor, "type", _type)
        self._mode = _CpuDeviceMode(self.device)
        self._mode.__enter__()
        return self

    def uninstall(self):
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self._mode = None
        while self._saved:
            obj, name, val = self._saved.pop()
            setattr(obj, name, val)

    __enter__ = install
    def __exit__(self, *exc):
        self.uninstall()


def install(fake_cuda_type=False):
    return CpuCudaShim(fake_cuda_type).install()
