"""Run in a fresh process by test_resume.py: ``save PATH`` trains 5 steps and checkpoints;
``resume PATH OUT`` loads that checkpoint into new objects and trains 5 more steps."""

from __future__ import annotations

import sys

import torch

from marsm_dist import MARSM
from tests.helpers import problem


def build(approx: bool):
    params = problem.leaf_params()
    opt = MARSM(problem.groups(params), lr=problem.BASE_LR, approx=approx)  # bf16 NS: the default
    sched = torch.optim.lr_scheduler.LambdaLR(opt, problem.schedule)
    return params, opt, sched


def train(params, opt, sched, start: int, stop: int, approx: bool) -> None:
    problem.train(params, opt, start, stop, approx=approx, set_to_none=False, sched=sched)


def final(params, opt):
    return {"params": {n: p.detach() for n, p in params.items()}, "optim": opt.state_dict()}


def main(argv: list[str]) -> None:
    cmd, path = argv[0], argv[1]
    if cmd == "save":
        ckpt = {}
        for approx in (True, False):
            params, opt, sched = build(approx)
            train(params, opt, sched, 0, 5, approx)
            ckpt[approx] = {"params": {n: p.detach() for n, p in params.items()},
                            "optim": opt.state_dict(), "sched": sched.state_dict()}
        torch.save(ckpt, path)
    elif cmd == "resume":
        ckpt, out = torch.load(path), {}
        for approx in (True, False):
            params, opt, sched = build(approx)
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(ckpt[approx]["params"][n])
            opt.load_state_dict(ckpt[approx]["optim"])
            sched.load_state_dict(ckpt[approx]["sched"])
            train(params, opt, sched, 5, 10, approx)
            out[approx] = final(params, opt)
        torch.save(out, argv[2])


if __name__ == "__main__":
    main(sys.argv[1:])
