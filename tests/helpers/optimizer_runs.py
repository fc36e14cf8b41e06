"""Short runs of MARSM on the shared problem (tests/helpers/problem.py), and exact comparisons of
two runs' parameters and optimizer state."""

from __future__ import annotations

import copy

import torch

from marsm_dist import MARSM
from tests.helpers import problem


def make(approx=True, **kw):
    params = problem.leaf_params()
    kw.setdefault("ns_dtype", torch.float32)
    return params, MARSM(problem.groups(params), lr=problem.BASE_LR, approx=approx, **kw)


def train(params, opt, steps, start=0, approx=True):
    problem.train(params, opt, start, start + steps, approx=approx)


def snapshot(params, opt):
    return copy.deepcopy({n: p.detach() for n, p in params.items()}), copy.deepcopy(opt.state_dict())


def assert_same(a, b):
    pa, sa = a
    pb, sb = b
    for n in pa:
        assert torch.equal(pa[n], pb[n]), n
    assert sa["state"].keys() == sb["state"].keys()
    for i, st in sa["state"].items():
        assert st.keys() == sb["state"][i].keys()
        for k, v in st.items():
            other = sb["state"][i][k]
            assert torch.equal(v, other) if torch.is_tensor(v) else v == other, (i, k)
