"""train.py --fused-head (the default): the student's logits are never built whole.

The student's forward stops before its output layer (a hook keeps the last hidden states h); the
losses receive a blocked.Head(h, W) and compute the logits h W^T block by block, with their
gradients (blocked.py), so no [tokens, vocabulary] tensor exists: at 4,096 tokens of a 128k
vocabulary that is 2 GB of fp32 logits and as much again for their gradient. It applies to a plain
output layer only; a model that caps or scales its logits trains on its whole logits instead. The
model's own logits decide, not a list of names: the first micro-step compares them with h W^T
within a relative tolerance (a multiplier of 0.9 no config name announces is a 10% difference at
any logit size).
"""

from __future__ import annotations

import inspect

import torch

import blocked
from run_dir import RunError

# Config fields by which a transformers model changes h W^T into its logits (Gemma 2/3's soft
# cap, Cohere's and Granite's scale): refused before the first step. The check against the model's
# own logits (FusedHead.__call__) finds any other transform; a soft cap alone it cannot find on a
# fresh model (tanh(x / 30) * 30 is x while the logits are small), hence this list.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")
# The largest difference between h W^T and the model's logits at the checked position, relative
# to their largest magnitude: the matmuls' rounding (bf16 on GPU: 2^-8) and no more
CHECK_RTOL = {None: 1e-4, torch.bfloat16: 2e-2}


def fused_head_problem(student) -> str | None:
    """Why the student's logits cannot be computed as h W^T from its decoder's output, or None."""
    if "logits_to_keep" not in inspect.signature(student.forward).parameters:
        return "its forward takes no logits_to_keep"
    decoder = getattr(student, "get_decoder", lambda: None)()
    if decoder is None or decoder is student:
        return "it has no separate decoder (get_decoder) to take the hidden states from"
    head = student.get_output_embeddings()
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return "its output layer is not a linear map without bias"
    for name in LOGIT_TRANSFORMS:
        if getattr(student.config, name, None) not in (None, 1, 1.0):
            return f"its config sets {name}"
    return None


class FusedHead:
    """The student's last hidden states, kept by a hook on its decoder, and its output layer. The
    first micro-step keeps the model's logits at one position and checks h W^T against them there,
    relative to their size (a model that transforms its logits would train on wrong ones); then
    the model computes no logits at all (logits_to_keep is empty)."""

    def __init__(self, student, cuda: bool):
        self.student, self.hidden, self.checked = student, None, False
        self.dtype = torch.bfloat16 if cuda else None  # the matmuls' dtype (bf16 on GPU)
        self.problem = fused_head_problem(student)
        if self.problem is None:
            student.get_decoder().register_forward_hook(self.keep_hidden)

    def keep_hidden(self, module, inputs, out) -> None:
        self.hidden = out[0]

    def forward_args(self, device: torch.device) -> dict:
        """The student forward's logits_to_keep: the first position while unchecked, then none."""
        return {
            "logits_to_keep": torch.zeros(int(not self.checked), dtype=torch.long, device=device)
        }

    def __call__(self, logits: torch.Tensor, agree) -> blocked.Head:
        """The logits as h W^T; the first time, checked on every rank (`agree`: the first
        rank's problem, on every rank)."""
        hidden, self.hidden = self.hidden, None
        head = blocked.Head(hidden, self.student.get_output_embeddings().weight, self.dtype)
        if not self.checked:
            first = torch.arange(len(hidden), device=hidden.device) * hidden.shape[1]
            error = relative_difference(head.logits(first), logits[:, 0])
            problem = agree(None if error <= CHECK_RTOL[self.dtype] else f"{error:.2g}")
            if problem:
                raise RunError(
                    "--fused-head: the student's logits are not h W^T of its last hidden states "
                    f"(they differ by {problem} of their size: its forward transforms them): "
                    "run with --no-fused-head"
                )
            self.checked = True
        return head


def relative_difference(mine: torch.Tensor, theirs: torch.Tensor) -> float:
    """max |mine - theirs| / max |theirs| (in fp32): 0.1 for logits scaled by 0.9, whatever their
    size; NaN-safe (a NaN is a difference)."""
    mine, theirs = mine.float(), theirs.float()
    error = ((mine - theirs).abs().max() / theirs.abs().max().clamp_min(1e-30)).item()
    return error if error == error else float("inf")
