"""AdamW whose every applied update satisfies the SVD constraint, one matrix at a time.

Each constrained weight is its own parameter group and is stepped alone: copy it (one matrix),
let AdamW update it, then project what the step changed (Projector.project_ with the copy as the
reference). Projecting the applied update, not the gradient, matters: Adam's element-wise scaling
would leak a projected gradient back into protected directions. Stepping per matrix means the only
copy ever held is one matrix, instead of a copy of all the parent's weights.

On a GPU the projection's matrix products run in full fp32, TF32 off whatever the process set: with
TF32's 10-bit mantissa the applied update would keep ~1e-3 of its size in the protected directions, ten
times what tests/test_osft_invariant.py allows.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from worker.osft.projector import Projector


@contextmanager
def ieee_fp32_matmul():
    previous = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.fp32_precision = previous


class ProjectedAdamW(torch.optim.AdamW):
    def __init__(self, params: list[torch.nn.Parameter], projectors: dict[torch.nn.Parameter, Projector],
                 **adamw_options):
        super().__init__([{"params": [param]} for param in params], **adamw_options)
        self.projectors = projectors

    @torch.no_grad()
    @ieee_fp32_matmul()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("ProjectedAdamW does not take a closure")
        groups = self.param_groups
        try:
            for group in groups:
                (param,) = group["params"]
                projector = self.projectors.get(param)
                reference = param.detach().clone() if projector is not None else None
                self.param_groups = [group]  # AdamW.step steps the groups it finds here: this one only
                super().step()
                if projector is not None:
                    projector.project_(param, reference)
        finally:
            self.param_groups = groups
