"""Peak memory per GPU of train.py under DDP and --fsdp, 1B student, teachers of 4B to 70B, 8 GPUs.

    python bench/fsdp_memory.py [--gpus 8] [--grad-accum 3]

Computed from parameter counts (the models' public configs) with two measured inputs:
  - MEASURED_1B_4B_DDP_GB: the peak of one H200 running --preset shapes-1b-4b (Llama-3.2-1B and
    Qwen3-4B shapes, 2 x 2,048 tokens a micro-step, P-KL; bench/results/gpu_h200.json). What is
    not weights, gradients or AdamW state (activations, logits, the losses' workspace, allocator
    slack) is that peak less the computed states, and is taken as the same for every teacher (a
    teacher's forward keeps no activations, but a wider teacher's layer takes more while it
    runs: a lower bound for the big ones).
  - the share of the student's weights and optimizer state one rank holds under --fsdp: 0.500 on
    2 ranks (tests/test_fsdp.py measures it from the shards' bytes), i.e. 1/world_size.
"""

from __future__ import annotations

import argparse

GB = 1e9
MEASURED_1B_4B_DDP_GB = 42.5
# name: (parameters, vocabulary, hidden size, decoder layers, tied embeddings)
STUDENT = ("Llama-3.2-1B", 1.236e9, 128_256, 2048, 16, True)
TEACHERS = [
    ("Qwen3-4B", 4.022e9, 151_936, 2560, 36, True),
    ("Qwen3-8B", 8.191e9, 151_936, 4096, 36, False),
    ("Qwen3-14B", 14.77e9, 151_936, 5120, 40, False),
    ("Qwen3-32B", 32.76e9, 151_936, 5120, 64, False),
    ("Llama-3.1-70B", 70.55e9, 128_256, 8192, 80, False),
]
STATE_BYTES = 4 + 4 + 8  # the student: fp32 weights, fp32 gradients, AdamW's two fp32 moments
TEACHER_BYTES = 2  # bf16


def unit_params(model) -> tuple[float, float]:
    """(parameters of FSDP's root unit: embeddings and output layer, of one decoder layer)."""
    _, params, vocab, hidden, layers, tied = model
    root = vocab * hidden * (1 if tied else 2)
    return root, (params - root) / layers


def memory(teacher, gpus: int, grad_accum: int) -> dict[str, float]:
    s_params, t_params = STUDENT[1], teacher[1]
    other = MEASURED_1B_4B_DDP_GB - (STATE_BYTES * s_params + TEACHER_BYTES * TEACHERS[0][1]) / GB
    ddp_bucket = 4 * s_params if gpus > 1 else 0  # DDP's gradient buckets (a copy of the grads)
    ddp = (STATE_BYTES * s_params + ddp_bucket + TEACHER_BYTES * t_params) / GB + other
    s_root, s_layer = unit_params(STUDENT)
    t_root, t_layer = unit_params(teacher)
    fsdp = (STATE_BYTES * s_params + TEACHER_BYTES * t_params) / gpus / GB + other
    # gathered while they run: the root unit and two layers (one prefetched), bf16 on GPUs
    fsdp += 2 * (s_root + 2 * s_layer) / GB + TEACHER_BYTES * (t_root + 2 * t_layer) / GB
    if grad_accum > 1:  # no reduce-scatter before the last micro-step: whole fp32 gradients
        fsdp += 4 * s_params / GB
    return {"ddp": ddp, "fsdp": fsdp, "other": other}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=3)
    args = p.parse_args()
    fits = lambda gb, card: "yes" if gb <= card else "no"  # noqa: E731
    print(f"1B student, {args.gpus} GPUs, --grad-accum {args.grad_accum}; GB per GPU (computed)")
    print("| teacher | DDP | --fsdp | DDP fits 80 / 141 GB | --fsdp fits 80 / 141 GB |")
    print("|---|---:|---:|---|---|")
    for teacher in TEACHERS:
        m = memory(teacher, args.gpus, args.grad_accum)
        print(
            f"| {teacher[0]} | {m['ddp']:.1f} | {m['fsdp']:.1f} | "
            f"{fits(m['ddp'], 80)} / {fits(m['ddp'], 141)} | "
            f"{fits(m['fsdp'], 80)} / {fits(m['fsdp'], 141)} |"
        )
    print(f"(activations, logits and workspace: {m['other']:.1f} GB, from the measured 1B/4B peak)")


if __name__ == "__main__":
    main()
