"""Our training step against nanochat's own, on one GPU, in one invocation: ratios and peak memory.

    python benchmarks/vs_nanochat.py --nanochat-src /path/to/nanochat --depth 20 --batch-sizes 32,16,8,4 \\
        --kernels torch,fused,fused-fp8 --memory fast --out vs.json

--nanochat-src (default: $NANOCHAT_SRC) is a checkout of nanochat at b399e43, fetched outside this repository
and never committed. Every configuration runs in its own subprocess (a clean allocator; an out-of-memory
kills only that one):

- nanochat, at each batch size: its own `GPT` and `GPTConfig` (imported from --nanochat-src), its own
  `setup_optimizers` (AdamW + Muon), `torch.compile(model, dynamic=False)`, bf16 autocast, and the step of its
  `scripts/base_train.py`: grad_accum micro-batches of forward + backward(loss / grad_accum), clipping with the
  grad norm read on the host, its LR multiplier and Muon momentum schedules, the optimizers, `zero_grad`.
- ours, for every --kernels x --memory x batch size: `benchmarks/train_throughput.py`'s configuration (the
  training loop's own build, prepare and `optimizer_step`).

Both feed random tokens of the same shape (the speed of a step does not depend on the text), seq 2048, total
batch 524,288, and report the median of the timed steps after --warmup. The table gives each configuration's
tok/s against nanochat at the same batch size; the memory frontier gives, for each budget in --budgets, the
fastest configuration of each side whose peak allocated memory fits, and their ratio.
`--device cpu` is a smoke test of the code paths (tiny sizes, no figures worth reading).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import statistics
import sys
import time
import types
from pathlib import Path

from common import KERNEL_VARIANTS, MEMORY_VARIANTS, format_row, run_configuration, write_json

HERE = Path(__file__).resolve().parent


def import_nanochat(src: str):
    """nanochat.gpt from a checkout; a third-party module it imports but the step never uses is stubbed,
    nanochat's own modules never."""
    sys.path.insert(0, src)
    try:
        for _ in range(10):
            try:
                return importlib.import_module("nanochat.gpt")
            except ModuleNotFoundError as e:
                if e.name is None or e.name.split(".")[0] == "nanochat":
                    raise
                sys.modules[e.name] = types.ModuleType(e.name)
        raise RuntimeError("too many missing modules while importing nanochat.gpt")
    finally:
        sys.path.remove(src)


def nanochat_schedules(step: int, num_iterations: int, warmdown_ratio: float = 0.2) -> tuple[float, float]:
    """base_train's LR multiplier (no warm-up, linear warm-down to 0) and Muon momentum (0.85 -> 0.95 over
    300 steps) at `step`."""
    warmdown = round(warmdown_ratio * num_iterations)
    lrm = 1.0 if step <= num_iterations - warmdown else (num_iterations - step) / warmdown
    frac = min(step / 300, 1)
    return lrm, (1 - frac) * 0.85 + frac * 0.95


def run_nanochat(args) -> dict:
    import torch

    nanochat_gpt = import_nanochat(args.nanochat_src)
    on_cuda = args.device == "cuda"
    device = torch.device(args.device)
    if not on_cuda and hasattr(torch.compiler, "set_stance"):
        torch.compiler.set_stance("force_eager")  # smoke test: no C++ toolchain needed for Muon's compile
    n_embd = 64 * args.depth
    n_head = max(1, (n_embd + 127) // 128)
    config = nanochat_gpt.GPTConfig(sequence_len=args.seq, vocab_size=args.vocab, n_layer=args.depth,
                                    n_head=n_head, n_kv_head=n_head, n_embd=n_embd)
    t_setup = time.perf_counter()
    with torch.device("meta"):
        model = nanochat_gpt.GPT(config)
    model.to_empty(device=device)
    torch.manual_seed(0)
    model.init_weights()
    orig_model = model
    optimizers = model.setup_optimizers()
    muon = optimizers[1]
    if on_cuda:
        model = torch.compile(model, dynamic=False)
    autocast = torch.amp.autocast(device_type="cuda", dtype=torch.bfloat16) if on_cuda else contextlib.nullcontext()
    grad_accum = args.total_batch // (args.batch_size * args.seq)
    gen = torch.Generator(device=device)
    gen.manual_seed(0)

    def next_batch():
        w = torch.randint(0, args.vocab, (args.batch_size * args.seq + 1,), device=device, generator=gen)
        return w[:-1].view(args.batch_size, args.seq), w[1:].view(args.batch_size, args.seq)

    sync = torch.cuda.synchronize if on_cuda else (lambda: None)
    setup_s = time.perf_counter() - t_setup
    times, losses = [], []
    x, y = next_batch()
    for step in range(args.warmup + args.steps):
        sync()
        t0 = time.perf_counter()
        for _ in range(grad_accum):
            with autocast:
                loss = model(x, y)
            train_loss = loss.detach()
            (loss / grad_accum).backward()
            x, y = next_batch()
        torch.nn.utils.clip_grad_norm_(orig_model.parameters(), 1.0).item()  # base_train reads it here
        lrm, momentum = nanochat_schedules(step, 1000)
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * lrm
        for group in muon.param_groups:
            group["momentum"] = momentum
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        sync()
        dt = time.perf_counter() - t0
        losses.append(train_loss.item())
        print(f"  nanochat step {step} {dt * 1000:.0f} ms loss {losses[-1]:.4f}", file=sys.stderr, flush=True)
        if step >= args.warmup:
            times.append(dt)
    dt = statistics.median(times)
    flops_per_token = orig_model.estimate_flops()
    return {
        "side": "nanochat", "depth": args.depth, "kernels": "nanochat", "memory": "fast", "batch_size": args.batch_size,
        "seq": args.seq, "total_batch": args.total_batch, "grad_accum": grad_accum, "setup_s": setup_s,
        "compile": "model" if on_cuda else "none",
        "median_step_s": dt, "tok_per_s": args.total_batch / dt,
        "mfu": 100 * flops_per_token * args.total_batch / dt / 989e12,
        "peak_alloc_gib": torch.cuda.max_memory_allocated() / 2**30 if on_cuda else 0.0,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if on_cuda else 0.0,
        "losses": losses, "step_times_s": times,
        "gpu": torch.cuda.get_device_name() if on_cuda else "cpu", "torch": torch.__version__,
    }


def frontier(results: list[dict], budgets: list[float]) -> list[dict]:
    """For each memory budget: the fastest configuration of each side that fits it, and our ratio."""
    rows = []
    for budget in budgets:
        best = {}
        for side in ("nanochat", "ours"):
            fits = [r for r in results if r.get("side") == side and "tok_per_s" in r and budget_gib(r) <= budget]
            best[side] = max(fits, key=lambda r: r["tok_per_s"]) if fits else None
        n, o = best["nanochat"], best["ours"]
        rows.append({"budget_gib": budget, "nanochat": n and _label(n), "nanochat_tok_s": n and n["tok_per_s"],
                     "ours": o and _label(o), "ours_tok_s": o and o["tok_per_s"],
                     "ratio": o["tok_per_s"] / n["tok_per_s"] if n and o else None})
    return rows


def budget_gib(r: dict) -> float:
    """The memory a configuration needs: its allocator peak, or with CUDA graphs what the process reserved
    (a graph's memory pool is held for its replays, so nothing else can use it)."""
    return r["peak_reserved_gib"] if r.get("cuda_graphs") else r["peak_alloc_gib"]


def _graphs(r: dict) -> str:
    return " +cuda_graphs" if r.get("cuda_graphs") else ""


def _label(r: dict) -> str:
    return f"{r['kernels']} B={r['batch_size']}" + ("" if r["memory"] == "fast" else f" {r['memory']}") + _graphs(r)


def report(results: list[dict], budgets: list[float]) -> list[dict]:
    """The table and, for each depth, the memory frontier; returns the frontier rows (with their depth)."""
    depths = sorted({r.get("depth", 20) for r in results})
    rows = []
    for depth in depths:
        rows += [{"depth": depth, **row} for row in
                 _report_depth([r for r in results if r.get("depth", 20) == depth], budgets, depth)]
    return rows


def _report_depth(results: list[dict], budgets: list[float], depth: int) -> list[dict]:
    ref = {r["batch_size"]: r["tok_per_s"] for r in results if r.get("side") == "nanochat" and "tok_per_s" in r}
    print(f"\nd{depth}")
    print("\n| configuration | B | memory | tok/s | vs nanochat, same B | MFU | peak GiB |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for r in results:
        if "tok_per_s" not in r:
            print(f"| {r['kernels']} | {r['batch_size']} | {r['memory']} | {r.get('error', '?')[:60]} | | | |")
            continue
        ratio = r["tok_per_s"] / ref[r["batch_size"]] if r["batch_size"] in ref else float("nan")
        print(f"| {r['kernels']}{_graphs(r)} | {r['batch_size']} | {r['memory']} | {r['tok_per_s']:,.0f} | {ratio:.3f} | "
              f"{r['mfu']:.1f}% | {budget_gib(r):.1f} |")
    rows = frontier(results, budgets)
    print("\n| memory budget | nanochat's best | tok/s | our best | tok/s | ratio |")
    print("|---:|---|---:|---|---:|---:|")
    for row in rows:
        ratio = f"{row['ratio']:.3f}" if row["ratio"] else "-"
        n_tok = f"{row['nanochat_tok_s']:,.0f}" if row["nanochat_tok_s"] else "-"
        o_tok = f"{row['ours_tok_s']:,.0f}" if row["ours_tok_s"] else "-"
        print(f"| {row['budget_gib']:g} GiB | {row['nanochat'] or 'none fits'} | {n_tok} | "
              f"{row['ours'] or 'none fits'} | {o_tok} | {ratio} |")
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nanochat-src", default=os.environ.get("NANOCHAT_SRC", ""),
                   help="a nanochat b399e43 checkout (default: $NANOCHAT_SRC)")
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=65536)
    p.add_argument("--total-batch", type=int, default=524288)
    p.add_argument("--batch-sizes", default="32,16,8,4")
    p.add_argument("--kernels", default="torch,fused,fused-fp8", help="ours: comma list of " + ", ".join(KERNEL_VARIANTS))
    p.add_argument("--memory", default="fast", help="ours: comma list of " + ", ".join(MEMORY_VARIANTS))
    p.add_argument("--budgets", default="80,40,24,16", help="GiB, for the memory frontier")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--timeout", type=int, default=400, help="seconds per configuration")
    p.add_argument("--out", default="")
    p.add_argument("--from", dest="from_", default="", help="comma list of --out files: report them together "
                   "(several invocations, e.g. one per GPU of a node) instead of running anything")
    p.add_argument("--skip-nanochat", action="store_true", help="time only ours (nanochat's figures at these "
                   "sizes come from another invocation, merged with --from): for a batch size nanochat cannot fit")
    p.add_argument("--one-nanochat", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--batch-size", type=int, default=32, help=argparse.SUPPRESS)
    args = p.parse_args()
    budgets = [float(b) for b in args.budgets.split(",")]
    if args.from_:
        results = []
        for path in args.from_.split(","):
            if not Path(path).is_file():
                p.error(f"--from {path}: no such file; pass the --out files of earlier invocations")
            results += json.loads(Path(path).read_text())["results"]
        rows = report(results, budgets)
        if args.out:
            write_json(args.out, {"results": results, "frontier": rows, "from": args.from_})
        return 0
    checkout_ok = bool(args.nanochat_src) and (Path(args.nanochat_src) / "nanochat" / "gpt.py").exists()
    if not checkout_ok and not (args.skip_nanochat and not args.nanochat_src):
        p.error(f"--nanochat-src {args.nanochat_src!r}: not a nanochat checkout (no nanochat/gpt.py); fetch "
                "karpathy/nanochat at b399e43 outside this repository and point --nanochat-src or NANOCHAT_SRC at it")
    if args.one_nanochat:
        print("RESULT " + json.dumps(run_nanochat(args)), flush=True)
        return 0

    common = ["--depth", str(args.depth), "--seq", str(args.seq), "--vocab", str(args.vocab),
              "--total-batch", str(args.total_batch), "--warmup", str(args.warmup), "--steps", str(args.steps),
              "--device", args.device]
    results = []
    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        configs = [] if args.skip_nanochat else [("nanochat", "nanochat", "fast")]
        configs += [("ours", k, m) for k in args.kernels.split(",") for m in args.memory.split(",")]
        for side, kernels, memory in configs:
            head = {"side": side, "depth": args.depth, "kernels": kernels, "batch_size": batch_size, "memory": memory}
            if side == "nanochat":
                cmd = [sys.executable, __file__, "--one-nanochat", "--nanochat-src", args.nanochat_src,
                       "--batch-size", str(batch_size), *common]
            else:
                cmd = [sys.executable, str(HERE / "train_throughput.py"), "--one", "--kernels", kernels,
                       "--memory", memory, "--batch-size", str(batch_size), *common]
            result = {**run_configuration(cmd, None, args.timeout, head), "side": side}
            results.append(result)
            print(format_row(result), flush=True)
            if args.out:
                write_json(args.out, {"results": results})
    rows = report(results, budgets)
    if args.out:
        write_json(args.out, {"results": results, "frontier": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
