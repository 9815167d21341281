"""DeepSpeed's ZeRO step against our own, on a tiny GPT (run by tests/test_deepspeed.py on CPU and by
tests/test_deepspeed_cuda.py on GPUs; not collected by pytest).

    python tests/deepspeed_e2e.py OUT --grad-clips 1.0,0.5      # our step: 1 process, 2 micro-steps per step
    accelerate launch --config_file configs/accelerate/deepspeed_zero2.yaml --num_processes 2 \\
        tests/deepspeed_e2e.py OUT --grad-clips 1.0,0.5         # DeepSpeed's: 2 gloo ranks x 1 micro-step

`--device cuda`: the same on GPUs (NCCL between ranks), as the loop runs there: bf16 autocast, fused AdamW,
Muon's Newton-Schulz compiled; the weights stay fp32 (wte included: DeepSpeed keeps it fp32, so ours does too,
where the loop would make it bf16). `--steps`, `--no-save`: fewer steps, no checkpoint part.

Both build the same tiny GPT, with every weight random (nanochat zero-initialises lm_head and the c_proj's, so its
first steps would give most matrices no gradient, and Muon nothing to orthogonalise), and run STEPS optimizer
steps on the same windows: ours through `setup.prepare_for_training` + `step.optimizer_step` (Muon + AdamW, Muon's
bf16 Newton-Schulz native), DeepSpeed's through the same set-up under Accelerate's DeepSpeed and
`deepspeed_zero.ZeroRun.optimizer_step`, once per --grad_clip value (a fresh model each time). Writes OUT/result.pt:
per value, the whole weights after every step, the losses and grad norms; and what ran. Under DeepSpeed the first
value's run is then saved as the loop saves one, into OUT/runs/zero/step_00000<STEPS>/ (each rank its shards), and
saved again after a NaN is written into rank 1's part of one weight (which must be refused).
"""

import argparse
import dataclasses
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from nanochat_unsloth.checkpoint import store
from nanochat_unsloth.checkpoint.meta import RunMeta
from nanochat_unsloth.model.build import ModelOptions
from nanochat_unsloth.model.gpt import GPT, GPTConfig
from nanochat_unsloth.train import bf16_gemm, deepspeed_zero
from nanochat_unsloth.train.config import TrainConfig
from nanochat_unsloth.train.setup import prepare_for_training
from nanochat_unsloth.train.step import optimizer_step
from cpu_launch import exit_without_finalization  # tests/ is sys.path[0] when run as a script

# vocab 65: wte / lm_head rows do not split evenly over 2 ranks; 64 tokens per step >= n_embd, so every gradient
# matrix has full rank (Newton-Schulz of a nearly singular matrix amplifies rounding without bound)
CONFIG = GPTConfig(sequence_len=16, vocab_size=65, n_layer=2, n_head=2, n_kv_head=2, n_embd=32)
B, T = 2, 16
GLOBAL_MICRO_BATCHES = 2  # per optimizer step, over all processes
STEPS = 3


def batch(window: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + window)
    w = torch.randint(0, CONFIG.vocab_size, (B * T + 1,), generator=g)
    return w[:-1].view(B, T).int().to(device), w[1:].view(B, T).long().to(device)


def build_model(device: str = "cpu") -> GPT:
    """Initialised on the CPU (the same weights whatever the device), then moved: every weight fp32."""
    with torch.device("meta"):
        model = GPT(CONFIG)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    with torch.no_grad():  # the zero-initialised weights get small random values (module doc)
        for name, p in model.named_parameters():
            if not p.any():
                p.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    return model.to(device)


def whole_weights(raw) -> dict:
    """Every weight whole, on the CPU (ZeRO-3 holds shards: gathered, a collective)."""
    params = list(raw.parameters())
    if hasattr(params[0], "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            return {k: v.detach().to("cpu", copy=True) for k, v in raw.state_dict().items()}
    return {k: v.detach().to("cpu", copy=True) for k, v in raw.state_dict().items()}


def main(out: Path, grad_clips: list[float], device: str = "cpu", steps: int = STEPS, save: bool = True):
    if device == "cpu":
        bf16_gemm.configure_cpu_bf16("native")  # DeepSpeed's Newton-Schulz runs native bf16 ops
    # as the loop: bf16 autocast on CUDA (ours through Accelerate, DeepSpeed's through its torch_autocast)
    accelerator = Accelerator(mixed_precision="bf16" if device == "cuda" else "no",
                              **deepspeed_zero.accelerator_kwargs(device))
    rank, world = accelerator.process_index, accelerator.num_processes
    accum = GLOBAL_MICRO_BATCHES // world
    cfg = TrainConfig(device_batch_size=B, max_seq_len=T, total_batch_size=B * T * GLOBAL_MICRO_BATCHES)
    zero = deepspeed_zero.configure(accelerator, cfg, accum)
    step_fn = zero.optimizer_step if zero else optimizer_step
    runs = {}
    for grad_clip in grad_clips:  # a fresh model, optimizer (and DeepSpeed engine) for each
        raw = build_model(device)
        prepared = prepare_for_training(accelerator, raw, ModelOptions(kernels="torch"), "muon")
        weights, losses, norms = [whole_weights(raw)], [], []
        for step in range(steps):
            # the loader's rule: the step's windows do not depend on how (world, accum) split them
            windows = iter([step * GLOBAL_MICRO_BATCHES + m * world + rank for m in range(accum)])
            res = step_fn(accelerator, prepared.model, raw, prepared.optimizers,
                          lambda: batch(next(windows), device), accum, step, 100, grad_clip=grad_clip,
                          global_mean=lambda t: accelerator.reduce(t, reduction="mean").item())
            losses.append(res.global_loss)
            norms.append(float(res.grad_norm) if res.grad_norm is not None else None)
            weights.append(whole_weights(raw))
        runs[grad_clip] = dict(weights=weights, losses=losses, grad_norms=norms)
        if zero and save and len(runs) == 1:  # the first engine (Accelerate saves every engine it has prepared)
            run_dir = out / "runs" / "zero"
            if accelerator.is_main_process:
                run_dir.mkdir(parents=True, exist_ok=True)
            meta = RunMeta(model_config=dataclasses.asdict(CONFIG), train_config=cfg.to_dict(), world_size=world,
                           grad_accum=accum, device_type=device, num_iterations=100, deepspeed=zero.describe())
            store.save_checkpoint(accelerator, run_dir, steps, meta, 0)
            # a NaN in rank 1's part of the weights only: every rank refuses the next save
            params = list(raw.parameters())
            with torch.no_grad():
                if rank == 1:
                    local = params[0].ds_tensor if hasattr(params[0], "ds_tensor") else params[0]
                    local.view(-1)[0] = float("nan")
            try:
                store.save_checkpoint(accelerator, run_dir, steps + 1, meta, 0)
                nan_refused = None
            except store.NonFiniteWeights as e:
                nan_refused = str(e)
    if accelerator.is_main_process:
        torch.save(dict(runs=runs, world_size=world, zero=zero.describe() if zero else None,
                        nan_refused=nan_refused if zero and save else None), out / "result.pt")
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("out", type=Path)
    p.add_argument("--grad-clips", default="1.0", help="comma-separated --grad_clip values, one run each")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--save", action=argparse.BooleanOptionalAction, default=True,
                   help="under DeepSpeed: save the first run, then refuse a save with a NaN on rank 1")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    main(args.out, [float(c) for c in args.grad_clips.split(",")], args.device, args.steps, args.save)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    exit_without_finalization()
