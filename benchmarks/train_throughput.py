"""Training throughput on the GPU: tok/s, MFU and peak memory of nanochat's step, per configuration.

    python benchmarks/train_throughput.py --depth 20 --kernels torch,fused --batch-sizes 32,16,8,4 \\
        --memory fast,lean --out bench.json --plot frontier.png

Each configuration runs in its own subprocess (a clean CUDA allocator, so peaks do not leak between
configurations, and an out-of-memory kills only that one). A configuration builds and prepares the model
with the training loop's own code (`model.build.build_model`, then `train.setup.prepare_for_training`:
optimizers, Accelerate, compilation), feeds random tokens at seq 2048 and total batch 524,288, and times
whole optimizer steps with the same `optimizer_step` the loop runs. Warm-up steps
(compilation) are excluded; the figure is the median of the timed steps. MFU uses nanochat's formula
on the 989 TFLOP/s H100 bf16 basis.

Configuration names (comma lists, crossed with --batch-sizes; the options each sets: common.KERNEL_VARIANTS and
common.MEMORY_VARIANTS):
    --kernels   torch | fused (`--kernels fused`) | torch-blocks (torch kernels, `--compile blocks`)
                | torch-fp8 | fused-fp8 (`--fp8`: block GEMMs in FP8)
                | fused-fp8-dynamic | fused-fp8-delayed (`--fp8_scaling ...`)
                | fused-model | fused-fp8-model (`--compile model --cuda_graphs off`: one graph, the fused loss
                outside it) | fused-cg | fused-fp8-cg (the same with `--cuda_graphs on`)
                | torch-cg | torch-nocg (`--cuda_graphs on|off`; plain `torch` takes `auto`)
                (records in docs/perf-log/ before 2026-11-28 call the fused set "unsloth"; those names are
                still accepted)
    --memory    fast | lean (training's default: Unsloth's offloaded checkpointing when available)
                | lean-K (`--lean_blocks K`: only the first K blocks checkpointed)
                | selective | selective-K (`--memory selective`: the MLP recomputed in backward, in all or K blocks)
                | lean-offload | lean-torch (`--lean_checkpoint offload|torch`)
                (runs recorded in docs/perf-log/ before 2026-11-24 called lean-torch "lean")

`--profile` adds a torch.profiler pass over one more step per configuration (`step.optimizer_step` with the
loop's `--profile_step` phase marks): GPU time per category (matmul / attention / elementwise /
loss / optimizer / data / memory / other), GPU idle time (launch gaps and host syncs), top kernels.
`--micro` times only the lm_head + softcap + cross-entropy (forward + backward) of each loss
implementation at one batch size (torch compiled and our chunked loss),
with its peak memory and its agreement with the torch loss.
`--device cpu` runs a tiny smoke test of every code path (no GPU figures).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

from common import (KERNEL_VARIANTS, MEMORY_VARIANTS, format_row, memory_variant, model_options, run_configuration,
                    write_json)

# -----------------------------------------------------------------------------
# One configuration (in its own process)


def setup(args):
    import torch
    from accelerate import Accelerator

    from nanochat_unsloth.model import fp8 as fp8_ops
    from nanochat_unsloth.model.build import build_model
    from nanochat_unsloth.model.gpt import GPTConfig
    from nanochat_unsloth.train import optim
    from nanochat_unsloth.train.setup import prepare_for_training

    on_cuda = args.device == "cuda"
    if args.fp8_anywhere:  # tests: torch._scaled_mm also runs on the CPU (slowly), enough for toy sizes
        fp8_ops.fp8_supported = lambda device: (True, "")
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    accelerator = Accelerator(mixed_precision="bf16" if on_cuda else "no", cpu=not on_cuda)
    device = accelerator.device
    options = model_options(args.kernels, args.memory, args.batch_size, args.seq, device)
    raw_model = build_model(GPTConfig.from_depth(args.depth, args.seq, args.vocab), options, device, seed=0)
    prepared = prepare_for_training(accelerator, raw_model, options, args.optimizer)
    model, optimizers, mode = prepared.model, prepared.optimizers, prepared.compile
    grad_accum = optim.grad_accum_steps(args.total_batch, args.batch_size, args.seq, 1)

    gen = torch.Generator(device=device)
    gen.manual_seed(0)

    def next_batch():
        # random tokens: the speed of a step does not depend on the text
        w = torch.randint(0, args.vocab, (args.batch_size * args.seq + 1,), device=device, generator=gen)
        return w[:-1].view(args.batch_size, args.seq).int(), w[1:].view(args.batch_size, args.seq)

    info = {"compile": mode, "cuda_graphs": prepared.cuda_graphs, "kernels_used": raw_model.ops.label,
            "flops_per_token": raw_model.estimate_flops(), "num_params": raw_model.num_params()}
    return accelerator, model, raw_model, optimizers, next_batch, grad_accum, info


def run_one(args) -> dict:
    import torch

    from nanochat_unsloth.model import fp8
    from nanochat_unsloth.model.gpt import PROMISED_FLOPS_H100
    from nanochat_unsloth.train.step import optimizer_step

    on_cuda = args.device == "cuda"
    sync = torch.cuda.synchronize if on_cuda else (lambda: None)
    t_setup = time.perf_counter()
    accelerator, model, raw_model, optimizers, next_batch, grad_accum, info = setup(args)
    setup_s = time.perf_counter() - t_setup

    # --fp8 starts with dynamic scaling and switches to delayed scaling after a few steps, compiling
    # the blocks again: warm-up lasts --warmup steps and at least one step in the final mode.
    times, losses = [], []
    step = steps_in_final_mode = 0
    while len(times) < args.steps:
        # final: no state left (dynamic scaling) or all of it active; re-read, the first step may drop it
        final_mode = all(s.active for s in fp8.delayed_scalings(raw_model))
        sync()
        t0 = time.perf_counter()
        out = optimizer_step(accelerator, model, raw_model, optimizers, next_batch, grad_accum, step, 1000,
                             cuda_graphs=info["cuda_graphs"])
        sync()
        dt = time.perf_counter() - t0
        losses.append(out.loss.item())  # after the clock: the benchmark's only per-step host read
        if step >= args.warmup and steps_in_final_mode >= 1:
            times.append(dt)
        steps_in_final_mode += final_mode
        print(f"  step {step} {dt * 1000:.0f} ms loss {losses[-1]:.4f}" + ("" if final_mode else " (dynamic fp8 scaling)"),
              file=sys.stderr, flush=True)
        step += 1
    peak_alloc = torch.cuda.max_memory_allocated() / 2**30 if on_cuda else 0.0
    peak_reserved = torch.cuda.max_memory_reserved() / 2**30 if on_cuda else 0.0
    profile = None
    if args.profile:
        profile = profile_step(accelerator, model, raw_model, optimizers, next_batch, grad_accum, on_cuda,
                               info["cuda_graphs"])
    dt = statistics.median(times)
    return {
        "depth": args.depth, "kernels": args.kernels, "batch_size": args.batch_size, "memory": args.memory,
        "optimizer": args.optimizer, "seq": args.seq, "total_batch": args.total_batch, "grad_accum": grad_accum,
        **info, "setup_s": setup_s,
        "median_step_s": dt, "tok_per_s": args.total_batch / dt,
        "mfu": 100 * info["flops_per_token"] * args.total_batch / dt / PROMISED_FLOPS_H100,
        "peak_alloc_gib": peak_alloc, "peak_reserved_gib": peak_reserved,
        "losses": losses, "step_times_s": times, "profile": profile,
        "gpu": torch.cuda.get_device_name() if on_cuda else "cpu", "torch": torch.__version__,
    }


# -----------------------------------------------------------------------------
# Profile: GPU time per category for one step


def profile_step(accelerator, model, raw_model, optimizers, next_batch, grad_accum, on_cuda, cuda_graphs=False) -> dict:
    """One `step.optimizer_step` under torch.profiler, its phases marked by the loop's PhaseTimer.

    Kernels that start inside the clip / optimizer phases (the timer syncs the device at every mark, so no
    earlier kernel spills in) count as optimizer; the others by kernel name.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from nanochat_unsloth.train.phase_timer import PhaseTimer
    from nanochat_unsloth.train.step import optimizer_step

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    timer = PhaseTimer(accelerator.device, enabled=True)
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        timer.start()
        optimizer_step(accelerator, model, raw_model, optimizers, next_batch, grad_accum, 10, 1000, timer=timer,
                       cuda_graphs=cuda_graphs)
        timer.mark("rest")  # zero_grad and the FP8 scaling switch
    wall_ms = (time.perf_counter() - t0) * 1000

    events = list(prof.events())
    marks = sorted((e.time_range.start, e.name) for e in events
                   if e.device_type == DeviceType.CPU and e.name.startswith(("phase_start", "phase_end:")))
    opt_ranges = [(a[0], b[0]) for a, b in zip(marks, marks[1:])
                  if b[1].startswith(("phase_end:clip", "phase_end:optimizer_", "phase_end:rest"))]
    by_cat, by_kernel, intervals = {}, {}, []
    for e in events:
        if e.device_type != DeviceType.CUDA or getattr(e, "is_user_annotation", False) or e.name.startswith("phase"):
            continue
        start, end = e.time_range.start, e.time_range.end
        ms = (end - start) / 1000
        if ms <= 0:
            continue
        intervals.append((start, end))
        cat = categorize(e.name)
        if cat not in ("data", "memory") and any(a <= start <= b for a, b in opt_ranges):
            cat = "optimizer"
        by_cat[cat] = by_cat.get(cat, 0.0) + ms
        by_kernel[e.name] = by_kernel.get(e.name, 0.0) + ms
    busy_ms = merged_length(intervals) / 1000
    top = sorted(by_kernel.items(), key=lambda kv: -kv[1])[:25]
    return {"wall_ms": wall_ms, "phases_ms": {k: v * 1000 for k, v in timer.seconds.items()},
            "gpu_kernel_ms": sum(by_cat.values()), "gpu_busy_ms": busy_ms,
            "gpu_idle_ms": max(0.0, wall_ms - busy_ms), "by_category_ms": by_cat,
            "top_kernels_ms": [[k[:140], v] for k, v in top]}


def merged_length(intervals) -> float:
    total, cur_start, cur_end = 0.0, None, None
    for a, b in sorted(intervals):
        if cur_end is None or a > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = a, b
        else:
            cur_end = max(cur_end, b)
    if cur_end is not None:
        total += cur_end - cur_start
    return total


def categorize(name: str) -> str:
    n = name.lower()
    if any(k in n for k in ("memcpy", "memset")):
        return "memory"
    if any(k in n for k in ("distribution", "randint", "random", "philox")):
        return "data"
    if any(k in n for k in ("flash", "fmha", "attention", "cudnn", "sdpa", "attn")):
        return "attention"
    # Inductor's generated kernels are named after the ops they fuse: "triton_poi_fused__scaled_mm__to_copy_..."
    # is FP8 quantisation feeding a GEMM, not a GEMM; only its templates ("triton_tem_") are matmuls.
    inductor = n.startswith("triton_") and not n.startswith("triton_tem")
    if not inductor and any(k in n for k in ("gemm", "nvjet", "cutlass", "sm90_xmma", "matmul", "cublas", "_mm_")):
        return "matmul"
    # the softcap (tanh), log-softmax / logsumexp and NLL of the loss, however Inductor names them
    if any(k in n for k in ("tanh", "log_softmax", "logsumexp", "cross_entropy", "nll", "_ce_chunk")):
        return "loss"
    if any(k in n for k in ("adam", "foreach", "multi_tensor", "lerp")):
        return "optimizer"
    if any(k in n for k in ("triton", "elementwise", "vectorized", "reduce", "fused", "rms", "relu", "pow")):
        return "elementwise"
    return "other"


# -----------------------------------------------------------------------------
# Micro benchmark: the loss alone


def run_micro(args) -> list[dict]:
    import torch

    from nanochat_unsloth.model import ops as K
    from nanochat_unsloth.model.lm_head_loss import chunked_lm_head_loss

    device = "cuda"
    n_embd = 64 * args.depth
    B, T, V = args.batch_size, args.seq, args.vocab
    g = torch.Generator(device=device).manual_seed(0)
    x0 = torch.randn(B, T, n_embd, device=device, generator=g).bfloat16()
    x0 = x0 / x0.float().pow(2).mean(-1, keepdim=True).sqrt().bfloat16()  # like the final rms_norm output
    w0 = torch.randn(V, n_embd, device=device, generator=g) * (n_embd ** -0.5)
    targets = torch.randint(0, V, (B, T), device=device, generator=g)
    targets[:, :7] = -1  # a few ignored positions

    variants = [("torch-compiled", torch.compile(K.torch_lm_head_loss, dynamic=False)),
                ("chunked", chunked_lm_head_loss)]
    results, ref = [], None
    for name, fn in variants:
        x = x0.clone().requires_grad_(True)
        w = w0.clone().requires_grad_(True)
        try:
            times = []
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            for it in range(args.warmup + args.steps):
                x.grad = w.grad = None
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = fn(x, w, targets, 15.0, "mean")
                loss.backward()
                end.record()
                torch.cuda.synchronize()
                if it >= args.warmup:
                    times.append(start.elapsed_time(end))
            peak = (torch.cuda.max_memory_allocated() - base) / 2**30
            out = {"loss_impl": name, "batch_size": B, "depth": args.depth, "median_ms": statistics.median(times),
                   "peak_extra_gib": peak, "loss": loss.item()}
            if ref is None:
                ref = (loss.detach().float(), x.grad.float(), w.grad.float())
            else:
                out["loss_rel_diff"] = abs(loss.item() - ref[0].item()) / abs(ref[0].item())
                out["grad_x_cos"] = torch.nn.functional.cosine_similarity(
                    x.grad.float().flatten(), ref[1].flatten(), dim=0).item()
                out["grad_w_cos"] = torch.nn.functional.cosine_similarity(
                    w.grad.float().flatten(), ref[2].flatten(), dim=0).item()
        except Exception as e:  # report and go on with the next variant
            out = {"loss_impl": name, "batch_size": B, "depth": args.depth, "error": f"{type(e).__name__}: {e}"[:300]}
        print("MICRO " + json.dumps(out), flush=True)
        results.append(out)
        del x, w
        torch.cuda.empty_cache()
    return results


# -----------------------------------------------------------------------------
# The sweep


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=65536)
    p.add_argument("--total-batch", type=int, default=524288)
    p.add_argument("--kernels", default="torch,fused", help="comma list of: " + ", ".join(KERNEL_VARIANTS))
    p.add_argument("--batch-sizes", default="32,16,8,4")
    p.add_argument("--memory", default="fast",
                   help="comma list of: " + ", ".join(MEMORY_VARIANTS) + ", lean-K / selective-K (only the first K blocks)")
    p.add_argument("--optimizer", default="muon", choices=("muon", "adamw8bit"))
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: a smoke test of the code paths")
    p.add_argument("--out", default="", help="JSON file of all results (rewritten after each configuration)")
    p.add_argument("--plot", default="", help="PNG of tok/s against peak memory")
    p.add_argument("--from", dest="from_json", default="",
                   help="comma list of saved --out JSON files: print their table and --plot them, run nothing")
    p.add_argument("--timeout", type=int, default=400, help="seconds per configuration")
    p.add_argument("--profile", action="store_true", help="also profile one step per configuration")
    p.add_argument("--micro", action="store_true", help="time the loss implementations alone (first batch size)")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--fp8-anywhere", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--batch-size", type=int, default=32, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.one:
        print("RESULT " + json.dumps(run_one(args)), flush=True)
        return 0
    if args.from_json:
        results = [r for f in args.from_json.split(",") for r in json.loads(Path(f).read_text())]
        return report(results, args.plot)
    if args.micro:
        args.batch_size = int(args.batch_sizes.split(",")[0])
        results = run_micro(args)
        if args.out:
            write_json(args.out, results)
        return 0

    kernel_list, memory_list = args.kernels.split(","), args.memory.split(",")
    for k in kernel_list:
        if k not in KERNEL_VARIANTS:
            p.error(f"--kernels {k!r}: choose from {', '.join(KERNEL_VARIANTS)}")
    for m in memory_list:
        try:
            memory_variant(m)
        except KeyError:
            p.error(f"--memory {m!r}: choose from {', '.join(MEMORY_VARIANTS)}, lean-K, selective-K")
    results = []
    for kernels, batch_size, memory in itertools.product(kernel_list, [int(b) for b in args.batch_sizes.split(",")],
                                                         memory_list):
        env = None  # every setting is a flag of the configuration's process
        cmd = [sys.executable, __file__, "--one", "--depth", str(args.depth), "--seq", str(args.seq),
               "--vocab", str(args.vocab), "--total-batch", str(args.total_batch), "--kernels", kernels,
               "--batch-size", str(batch_size), "--memory", memory, "--optimizer", args.optimizer,
               "--warmup", str(args.warmup), "--steps", str(args.steps), "--device", args.device]
        cmd += ["--profile"] if args.profile else []
        cmd += ["--fp8-anywhere"] if args.fp8_anywhere else []
        head = {"depth": args.depth, "kernels": kernels, "batch_size": batch_size, "memory": memory}
        result = run_configuration(cmd, env, args.timeout, head)
        results.append(result)
        print(format_row(result), flush=True)
        if result.get("profile"):
            print(format_profile(result["profile"]), flush=True)
        if args.out:
            write_json(args.out, results)

    return report(results, args.plot)


def report(results: list[dict], plot_path: str) -> int:
    """The table last (the device reply carries the end of the output), then the frontier plot if asked."""
    print("\n" + format_table(results))
    if plot_path:
        try:
            plot_frontier(results, plot_path)
        except ImportError as e:
            print(f"no plot: {e}")
    return 0


def format_profile(prof: dict) -> str:
    lines = [f"    profile: wall {prof['wall_ms']:.0f} ms, GPU busy {prof['gpu_busy_ms']:.0f} ms, "
             f"idle {prof['gpu_idle_ms']:.0f} ms"]
    total = prof["gpu_kernel_ms"] or 1.0
    for cat, ms in sorted(prof["by_category_ms"].items(), key=lambda kv: -kv[1]):
        lines.append(f"      {cat:<12} {ms:8.1f} ms  {100 * ms / total:5.1f}%")
    for name, ms in prof["top_kernels_ms"][:12]:
        lines.append(f"      {ms:8.1f} ms  {name[:110]}")
    return "\n".join(lines)


def format_table(results: list[dict]) -> str:
    lines = ["| depth | kernels | B | memory | tok/s | MFU | peak alloc GiB | step ms | last loss |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['depth']} | {r['kernels']} | {r['batch_size']} | {r['memory']} | {r['error'][:60]} | | | | |")
        else:
            lines.append(f"| {r['depth']} | {r['kernels']} | {r['batch_size']} | {r['memory']} | "
                         f"{r['tok_per_s']:,.0f} | {r['mfu']:.1f}% | {r['peak_alloc_gib']:.1f} | "
                         f"{r['median_step_s'] * 1000:.0f} | {r['losses'][-1]:.4f} |")
    return "\n".join(lines)


def plot_frontier(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ok = [r for r in results if "error" not in r]
    for kernels in sorted({r["kernels"] for r in ok}):
        for memory in sorted({r["memory"] for r in ok}):
            pts = sorted((r["peak_alloc_gib"], r["tok_per_s"], r["batch_size"]) for r in ok
                         if r["kernels"] == kernels and r["memory"] == memory)
            if not pts:
                continue
            ax.plot([q[0] for q in pts], [q[1] for q in pts], marker="o", label=f"{kernels}/{memory}")
            for x, y, b in pts:
                ax.annotate(f"B={b}", (x, y), fontsize=7)
    for budget in (16, 24, 40, 80):
        ax.axvline(budget, color="grey", lw=0.5, ls=":")
    ax.set_xlabel("peak allocated GiB")
    ax.set_ylabel("tok/s")
    ax.set_title(f"d{ok[0]['depth'] if ok else '?'}: throughput against memory")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
