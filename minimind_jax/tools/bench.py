"""`minimind-jax bench`: train-step throughput, MFU and memory, beside an eager-PyTorch baseline
(transformers' Llama sized alike) and, with `--reference_dir`, the real reference's own model
and step from a checkout of jingyaogong/minimind.

MFU uses PaLM's model FLOPs per token, 6 * params + 12 * n_layers * dim * seq_len (an MoE counts
the parameters a token goes through: top-k of the routed experts, not all), against a
peak measured in the same run, before and after the steps (the higher counts): on CPU the float32
GFLOP/s of a 2048^3 matmul, on GPU a large bfloat16 matmul (the card's dense bf16 peak is printed
beside it when known).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import sys
import time

import jax
import numpy as np

from minimind_jax.data import packing
from minimind_jax.errors import UserError
from minimind_jax.model.config import ModelConfig
from minimind_jax.model.flags import HelpFormatter, add_model_args, model_config_from_args
from minimind_jax.runtime import host_memory

# Dense bf16 tensor-core peaks (no sparsity) from the vendors' data sheets, in TFLOP/s.
DATASHEET_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0}


@dataclasses.dataclass(frozen=True)
class StepStats:
    """Timing of one implementation's train step."""

    name: str
    step_s: float
    compile_s: float
    tokens_per_s: float
    peak_bytes: int | None
    page_faults_per_step: float  # host minor faults: memory the allocator handed back and refetched
    first_loss: float | None = None  # loss of the first step: equal weights give equal losses


def model_flops_per_token(n_params: int, config: ModelConfig, seq_len: int) -> float:
    """PaLM's convention: 6N for the weights plus 12 * layers * dim * T for attention."""
    return 6.0 * n_params + 12.0 * config.n_layers * config.dim * seq_len


def measured_peak_flops(dtype: str, size: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of a size^3 matmul in `dtype` on the default device (best of `repeats`)."""
    a = jax.random.normal(jax.random.PRNGKey(0), (size, size), dtype)
    b = jax.random.normal(jax.random.PRNGKey(1), (size, size), dtype)
    matmul = jax.jit(lambda x, y: x @ y)
    jax.block_until_ready(matmul(a, b))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(matmul(a, b))
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best


def _peak_memory_bytes() -> int | None:
    device = jax.devices()[0]
    if device.platform == "cpu":
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # peak RSS
    stats = device.memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def synthetic_batch(batch_size: int, seq_len: int, vocab_size: int, seed: int = 0,
                    doc_len: int | None = None) -> dict:
    """Random token ids with every target supervised (the worst case for the loss). With
    `doc_len`, rows are packed as `--pack` packs them: documents of doc_len/2..3*doc_len/2
    tokens back to back, with segment ids, positions restarting per document and no target
    across a document boundary."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab_size, (batch_size, seq_len + 1), dtype=np.int32)
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:],
             "loss_mask": np.ones((batch_size, seq_len), np.float32)}
    if doc_len:
        segments = np.zeros((batch_size, seq_len), np.int32)
        positions = np.zeros((batch_size, seq_len), np.int32)
        for row in range(batch_size):
            lengths, start = [], 0
            while start < seq_len:
                lengths.append(min(int(rng.integers(max(1, doc_len // 2), doc_len * 3 // 2 + 1)),
                                   seq_len - start))
                start += lengths[-1]
            segments[row], positions[row] = packing.segments_and_positions(lengths)
            # a document's last token: its target is the next document
            batch["loss_mask"][row, np.cumsum(lengths) - 1] = 0.0
        batch |= {"segment_ids": segments, "positions": positions}
    return batch


def _time_steps(name: str, one_step, batch: dict, steps: int, warmup: int) -> StepStats:
    """Time the first call (compile), `warmup` more, then the median of `steps` calls."""
    start = time.perf_counter()
    first_loss = one_step()
    first_s = time.perf_counter() - start
    for _ in range(warmup):
        one_step()
    faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        one_step()
        times.append(time.perf_counter() - start)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before) / steps
    step_s = float(np.median(times))
    return StepStats(name, step_s, first_s, batch["input_ids"].size / step_s,
                     _peak_memory_bytes(), faults,
                     None if first_loss is None else float(first_loss))


def jax_stepper(config: ModelConfig, batch: dict):
    """(one_step, n_params): a closure running our jitted train step (the one `train.py` runs)
    on a fixed device batch, returning its loss once computed, and the parameters a token goes
    through (an MoE's unused routed experts left out)."""
    from minimind_jax.model.transformer import count_active_params, init_params
    from minimind_jax.train import optim, train_step

    mesh = train_step.data_mesh()
    params = init_params(config, 0)
    n_params = count_active_params(params, config)
    optimizer = optim.make_optimizer(accumulation_steps=1)
    schedule = optim.Schedule("cosine", 5e-4, total_steps=10_000)
    state = train_step.put_replicated(train_step.create_train_state(params, optimizer), mesh)
    step_fn = train_step.make_train_step(config, optimizer, schedule, mesh)
    device_batch = train_step.put_batch(batch, mesh)

    def one_step():
        nonlocal state
        state, metrics = step_fn(state, device_batch)
        return jax.block_until_ready(metrics["loss"])

    return one_step, n_params


def bench_jax(config: ModelConfig, batch: dict, steps: int, warmup: int) -> tuple[StepStats, int]:
    """Time our jitted train step on a fixed batch."""
    one_step, n_params = jax_stepper(config, batch)
    return _time_steps("jax", one_step, batch, steps, warmup), n_params


def _torch_device(torch) -> str:
    """The device a PyTorch baseline runs on (CUDA when JAX runs on a GPU), with CUDA's peak
    memory reset so that the baseline reports its own peak, not an earlier one's."""
    if jax.default_backend() == "gpu" and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return "cuda"
    return "cpu"


def bench_torch(config: ModelConfig, batch: dict, steps: int, warmup: int,
                dtype: str) -> StepStats | None:
    """Eager PyTorch: transformers' LlamaForCausalLM sized alike, masked CE, clip, AdamW."""
    try:
        import torch
        import transformers
    except ImportError:
        print("  (torch/transformers not installed: no PyTorch baseline)")
        return None
    device = _torch_device(torch)
    hf_config = transformers.LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.dim, intermediate_size=config.hidden_dim,
        num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads, rms_norm_eps=config.norm_eps,
        max_position_embeddings=max(config.max_seq_len, 1024), tie_word_embeddings=True,
        attention_bias=False, mlp_bias=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(hf_config).to(device).train()
    if hasattr(model.config, "_attn_implementation"):
        model.config._attn_implementation = "sdpa"
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.01)
    ids = torch.from_numpy(batch["input_ids"]).long().to(device)
    labels = torch.from_numpy(batch["labels"]).long().to(device)
    mask = torch.from_numpy(batch["loss_mask"]).to(device)
    autocast_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)

    def one_step():
        with torch.autocast(device, dtype=autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None):
            logits = model(input_ids=ids).logits
        ce = torch.nn.functional.cross_entropy(logits.float().view(-1, logits.size(-1)),
                                               labels.view(-1), reduction="none")
        loss = (ce * mask.view(-1)).sum() / mask.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        return float(loss.detach())

    stats = _time_steps("torch-eager", one_step, batch, steps, warmup)
    # On CPU the process's peak RSS is JAX's as much as torch's, so none is claimed for torch.
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    return dataclasses.replace(stats, peak_bytes=peak)


def bench_reference(config: ModelConfig, batch: dict, steps: int, warmup: int,
                    reference_dir) -> StepStats:
    """The real reference's model and train step from the checkout at `reference_dir`, with
    our config and our initial weights (`reference_bench`)."""
    import pathlib

    try:
        import torch
    except ImportError:
        raise UserError("--reference_dir needs torch (pip install -e '.[torch]')") from None

    from minimind_jax.model.transformer import init_params
    from minimind_jax.tools import reference_bench

    device = _torch_device(torch)
    model, layout = reference_bench.build_reference(pathlib.Path(reference_dir), config,
                                                    init_params(config, 0), device)
    scaler = " + GradScaler" if layout.grad_scaler else ""
    autocast = f"{layout.cuda_autocast} autocast{scaler}" if device == "cuda" else "float32"
    print(f"  reference: {layout.name} {layout.model_class} from {reference_dir} ({device}, "
          f"{autocast}, as its train_pretrain.py)")
    stats = _time_steps("reference", reference_bench.reference_step(model, layout, batch, device),
                        batch, steps, warmup)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    return dataclasses.replace(stats, peak_bytes=peak)


def _fmt_bytes(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"


# JSON key of "ours / that run" tokens/s for each baseline.
SPEEDUP_KEYS = {"torch-eager": "speedup_vs_torch", "reference": "speedup_vs_reference"}


def _report_run(run, flops_per_token: float, peak: float, datasheet_tflops: float | None
                ) -> dict:
    """Print one run's row (MFU of the measured peak, and of the datasheet's on a known GPU);
    return its figures."""
    mfu = run.tokens_per_s * flops_per_token / peak
    sheet = ""
    if datasheet_tflops:
        mfu_sheet = run.tokens_per_s * flops_per_token / (datasheet_tflops * 1e12)
        sheet = f", MFU vs datasheet {mfu_sheet:.1%}"
    print(f"  {run.name:12s} {run.tokens_per_s:10.0f} tokens/s  step {run.step_s * 1e3:8.1f} ms"
          f"  first step/compile {run.compile_s:6.1f} s  peak mem {_fmt_bytes(run.peak_bytes)}"
          f"  page faults/step {run.page_faults_per_step:,.0f}  MFU {mfu:.1%}{sheet}")
    return dataclasses.asdict(run) | {"mfu": mfu}


def run_bench(config: ModelConfig, batch_size: int, seq_len: int, steps: int, warmup: int,
              with_torch: bool, reference_dir=None, peak_size: int | None = None,
              doc_len: int | None = None) -> dict:
    """Measure peak, our step and (optionally) the eager-PyTorch step and the real reference's
    step from a checkout; print and return figures."""
    backend = jax.default_backend()
    device = jax.devices()[0]
    peak_dtype = "float32" if backend == "cpu" else "bfloat16"
    peak_size = peak_size or (2048 if backend == "cpu" else 8192)
    peak_before = measured_peak_flops(peak_dtype, peak_size)
    print(f"device: {device.device_kind} x{jax.device_count()} ({backend}); "
          f"measured {peak_dtype} matmul peak {peak_before / 1e9:.1f} GFLOP/s")
    hugepages = host_memory.hugepages_active()
    print(host_memory.describe())
    known = next((v for k, v in DATASHEET_BF16_TFLOPS.items() if k in device.device_kind), None)
    if backend == "gpu" and known:
        print(f"  datasheet dense bf16 peak: {known:.0f} TFLOP/s")
    batch = synthetic_batch(batch_size, seq_len, config.vocab_size, doc_len=doc_len)
    print(f"config: dim={config.dim} layers={config.n_layers} heads={config.n_heads}/"
          f"{config.n_kv_heads} moe={config.use_moe} dtype={config.dtype} "
          f"attention={config.attention_impl} remat={config.remat} scan={config.scan_layers}; "
          f"batch {batch_size} x {seq_len}"
          + (f", packed documents of ~{doc_len} tokens" if doc_len else ""))
    ours, n_params = bench_jax(config, batch, steps, warmup)
    runs = [ours]
    if with_torch:
        theirs = bench_torch(config, batch, steps, warmup, config.dtype)
        if theirs:
            runs.append(theirs)
    if reference_dir is not None:
        runs.append(bench_reference(config, batch, steps, warmup, reference_dir))
    # A neighbour's load during one peak measurement would inflate every MFU: measure again
    # after the steps and divide by the higher of the two.
    peak_after = measured_peak_flops(peak_dtype, peak_size)
    peak = max(peak_before, peak_after)
    print(f"  matmul peak again after the steps: {peak_after / 1e9:.1f} GFLOP/s; MFU uses "
          f"{peak / 1e9:.1f}")
    flops_per_token = model_flops_per_token(n_params, config, seq_len)
    results = {"device": device.device_kind, "backend": backend, "peak_flops": peak,
               "peak_flops_before": peak_before, "peak_flops_after": peak_after,
               "n_params": n_params,  # per token: an MoE's unused routed experts left out
               "flops_per_token": flops_per_token,
               "batch_size": batch_size, "seq_len": seq_len, "doc_len": doc_len,
               "config": config.to_dict(),
               "host_hugepages": hugepages}
    for run in runs:
        results[run.name] = _report_run(run, flops_per_token, peak,
                                        known if backend == "gpu" else None)
    for other in runs[1:]:
        ratio = runs[0].tokens_per_s / other.tokens_per_s
        print(f"  jax / {other.name} tokens/s: {ratio:.2f}x")
        results[SPEEDUP_KEYS[other.name]] = ratio
    if reference_dir is not None:
        print(f"  first-step loss (same weights, same batch): jax {ours.first_loss:.6f}, "
              f"reference {runs[-1].first_loss:.6f}")
    return results



def _run(args: argparse.Namespace) -> int:
    config = model_config_from_args(args)
    seq_len = args.seq_len or config.max_seq_len
    if args.doc_len is not None and args.doc_len < 1:
        raise UserError(f"--doc_len must be >= 1, got {args.doc_len}")
    results = run_bench(config, args.batch_size, seq_len, args.steps, args.warmup,
                        with_torch=not args.no_torch, reference_dir=args.reference_dir,
                        peak_size=args.peak_size, doc_len=args.doc_len)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    sys.stdout.flush()
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", formatter_class=HelpFormatter,
        help="benchmark the train step: tokens/s, MFU, memory, vs eager PyTorch",
        description=__doc__)
    add_model_args(p)
    p.add_argument("--batch_size", type=int, default=8, help="rows per step")
    p.add_argument("--seq_len", type=int, default=None,
                   help="tokens per row (default: max_seq_len of the model, 512)")
    p.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps after compilation")
    p.add_argument("--doc_len", type=int, default=None,
                   help="time packed rows (as pretrain --pack makes them): documents of about "
                        "this many tokens with segment masks (our step only; the PyTorch "
                        "baselines have no packing and get plain rows)")
    p.add_argument("--no_torch", action="store_true", help="skip the eager-PyTorch baseline")
    p.add_argument("--reference_dir", default=None,
                   help="a checkout of jingyaogong/minimind (d9453ed for --arch minimind2, HEAD "
                        "d65ef2c for --arch minimind3): also time its own model class and train "
                        "step with our config and initial weights (needs torch)")
    p.add_argument("--peak_size", type=int, default=None,
                   help="side of the square matmul that measures the peak (default 2048 on "
                        "CPU, 8192 on GPU/TPU)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.set_defaults(func=_run, host_hugepages=True)
