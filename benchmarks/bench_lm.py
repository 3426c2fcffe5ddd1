"""SPD steps on a Llama-style language model: time and memory against the number of
decomposed modules (a benchmark, not a test).

    python benchmarks/bench_lm.py [--layers 1 2 4 8] [--routing subset layerwise]
        [--steps 3] [--json out.json] [--figure out.png] [--device cpu|cuda]
        [--ci-fn mlp|vector_mlp|global_mlp|global_transformer]
    python benchmarks/bench_lm.py --replay [--json out.json]   # cost of a pass masking layer k

The model is a `LlamaForCausalLM` built from a config (random init, nothing downloaded):
8 layers, d_model 256, MLP 1024, vocabulary 8192, batch 16 × 128 tokens, KL divergence, the
bundled hf_lm SPD settings (C 256, CI hidden 16). For each setting, the MLP matrices (gate, up,
down) of the first k layers are decomposed: the first layers are the worst case for prefix
replay, since every pass then starts near the embeddings.

  subset     VPD's recipe: only L_stochastic-recon-subset (uniform_k per position)
  layerwise  the paper's L_stochastic-recon + L_stochastic-recon-layerwise (1 + L passes)

Each setting runs in its own process (peak RSS is a process high-water mark): it reports the
median ms per SPD step, the same batch's target forward + backward (a CE training step of the
undecomposed model, timed in the same process), their ratio, peak RSS, and the RSS after the
model was built (what the decomposition itself adds is the difference).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

ARCH = dict(
    vocab_size=8192,
    hidden_size=256,
    intermediate_size=1024,
    num_hidden_layers=8,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=256,
    use_cache=False,
)
BATCH, SEQ, C = 16, 128, 256


def build_llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**ARCH)).eval()


def spd_config(n_layers: int, routing: str, ci_fn: str = "mlp"):
    from spdkit.config import parse_config

    recon = (
        {"stochastic_recon_coeff": 0.0, "stochastic_recon_layerwise_coeff": 0.0}
        | {"stochastic_recon_subset_coeff": 1.0}
        if routing == "subset"
        else {"stochastic_recon_coeff": 1.0, "stochastic_recon_layerwise_coeff": 1.0}
    )
    layers = "0" if n_layers == 1 else f"[0-{n_layers - 1}]"
    return parse_config(
        {
            "modules": [{"pattern": f"model.layers.{layers}.mlp.*_proj", "C": C}],
            "ci_hidden_dim": 16,
            "importance_minimality_coeff": 1e-3,
            "pnorm": 1,
            "output_loss": "kl",
            "steps": 100,
            "batch_size": BATCH,
            "optimizer": {"lr": 1e-3},
            **recon,
            **({} if ci_fn == "mlp" else {"ci_fn": {"kind": ci_fn}}),
        }
    )


def ms(fn, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - t0)


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one_setting(n_layers: int, routing: str, steps: int, device: str, ci_fn: str) -> dict:
    """Runs in a child process: one decomposition setting, timed."""
    from spdkit.engine.malloc import keep_freed_memory
    from spdkit.targets.hf import RandomTokens
    from spdkit.training.loop import build_trainer

    keep_freed_memory()
    target = build_llama().to(device)
    x = RandomTokens(ARCH["vocab_size"], SEQ).sample(
        BATCH, torch.Generator(device=device).manual_seed(0)
    )

    def target_fwd_bwd() -> None:  # one CE training step's forward + backward of the target
        target.requires_grad_(True)
        logits = target(x).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        target.zero_grad(set_to_none=True)
        target.requires_grad_(False)

    target_fwd_bwd()
    base_times = [ms(target_fwd_bwd, device) for _ in range(5)]
    rss_model = rss_mb()

    class Data:
        def sample(self, batch_size, generator):
            return x

    config = spd_config(n_layers, routing, ci_fn)
    trainer = build_trainer(target, Data(), config, device)
    trainer.faithfulness_warmup()  # a run's first phase (Trainer.run); none if not configured
    trainer.train_step()  # warm-up (kernel build, allocator)
    times = [ms(trainer.train_step, device) for _ in range(steps)]
    base = statistics.median(base_times)
    step = statistics.median(times)
    row = {
        "routing": routing,
        "ci_fn": ci_fn,
        "decomposed_layers": n_layers,
        "decomposed_modules": len(trainer.model.module_names),
        "ms_per_step": round(step, 1),
        "ms_min": round(min(times), 1),
        "target_fwd_bwd_ms": round(base, 1),
        "step_over_fwd_bwd": round(step / base, 2),
        "peak_rss_mb": round(rss_mb(), 0),
        "rss_after_model_mb": round(rss_model, 0),
    }
    if device.startswith("cuda"):
        row["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 0)
    return row


def replay_profile(device: str, repeats: int = 5) -> list[dict]:
    """Prefix replay: ms of one masked pass that masks only layer k's up_proj, forward alone
    (no grad) and forward + backward, with the shortcuts and without, against (L − k) / L.
    Without replay the backward already covers only layers k.. (nothing before them needs a
    gradient), so replay saves the prefix's forward; the unembedding (vocabulary 8192) and the
    loss are a cost no replay can skip."""
    from spdkit.config import ModuleSpec
    from spdkit.method.model import ALL_SHORTCUTS, NO_SHORTCUTS, ComponentModel
    from spdkit.targets.hf import RandomTokens

    target = build_llama().to(device)
    L = ARCH["num_hidden_layers"]
    model = ComponentModel(target, [ModuleSpec(pattern="model.layers.*.mlp.up_proj", C=C)], 16)
    model.to(device)
    x = RandomTokens(ARCH["vocab_size"], SEQ).sample(
        BATCH, torch.Generator(device=device).manual_seed(0)
    )
    record = model.record(x)
    rows = []
    for k in range(L):
        name = f"model.layers.{k}.mlp.up_proj"
        mask = torch.rand(BATCH, SEQ, C, device=device)

        def one_pass(shortcuts=ALL_SHORTCUTS, backward=True, masks={name: mask}):  # noqa: B006
            with torch.set_grad_enabled(backward):
                y = model.masked_forward(x, masks, record, shortcuts=shortcuts)
            if backward:
                y.float().square().mean().backward()

        one_pass()
        row = {"masked_layer": k, "expected_(L-k)/L": round((L - k) / L, 3)}
        for label, backward in (("forward", False), ("forward_backward", True)):
            fast = statistics.median(
                ms(lambda b=backward: one_pass(ALL_SHORTCUTS, b), device) for _ in range(repeats)
            )
            plain = statistics.median(
                ms(lambda b=backward: one_pass(NO_SHORTCUTS, b), device) for _ in range(repeats)
            )
            row[f"{label}_replayed_ms"] = round(fast, 1)
            row[f"{label}_full_ms"] = round(plain, 1)
            row[f"{label}_ratio"] = round(fast / plain, 3)
        rows.append(row)
        print(
            f"layer {k}: forward {row['forward_replayed_ms']:6.0f} ms replayed / "
            f"{row['forward_full_ms']:6.0f} ms full = {row['forward_ratio']:.2f}; "
            f"forward+backward {row['forward_backward_replayed_ms']:6.0f} / "
            f"{row['forward_backward_full_ms']:6.0f} = {row['forward_backward_ratio']:.2f}; "
            f"(L - k) / L = {(L - k) / L:.2f}",
            flush=True,
        )
    # the part no replay can skip: the final norm, the unembedding and the loss
    probe = {"model.layers.7.mlp.up_proj": torch.zeros(BATCH, SEQ, C, device=device)}
    with torch.no_grad():
        head = statistics.median(
            ms(lambda: model.masked_forward(x, probe, record), device) for _ in range(repeats)
        )
    print(f"(a forward that replays every layer but the last: {head:.0f} ms)")
    return rows


def figure(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(10, 4))
    for routing in sorted({r["routing"] for r in rows}):
        sel = sorted(
            (r for r in rows if r["routing"] == routing), key=lambda r: r["decomposed_modules"]
        )
        n = [r["decomposed_modules"] for r in sel]
        ax_mem.plot(n, [r["peak_rss_mb"] / 1024 for r in sel], "o-", label=routing)
        ax_time.plot(n, [r["step_over_fwd_bwd"] for r in sel], "o-", label=routing)
    ax_mem.set(xlabel="decomposed modules", ylabel="peak RSS (GiB)", title="memory per step")
    ax_time.set(
        xlabel="decomposed modules",
        ylabel="SPD step / target forward+backward",
        title="time per step",
    )
    for ax in (ax_mem, ax_time):
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Llama-style LM (8 layers, d 256, MLP 1024, vocab 8192), batch 16 × 128, C 256")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, nargs="*", default=[1, 2, 4, 8])
    parser.add_argument("--routing", nargs="*", default=["subset", "layerwise"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None)
    parser.add_argument("--figure", default=None)
    parser.add_argument(
        "--replay", action="store_true", help="only the prefix-replay profile (one pass per layer)"
    )
    parser.add_argument(
        "--ci-fn",
        default="mlp",
        choices=["mlp", "vector_mlp", "global_mlp", "global_transformer"],
        help="the CI function's kind (its default sizes)",
    )
    parser.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.replay:
        rows = replay_profile(args.device)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"torch": torch.__version__, "arch": ARCH, "replay": rows}, f, indent=2)
        return
    if args.child:
        row = one_setting(int(args.child[0]), args.child[1], args.steps, args.device, args.ci_fn)
        print("ROW " + json.dumps(row), flush=True)
        return
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}")
    print(f"{'routing':<10}{'layers':>7}{'modules':>8}{'ms/step':>10}{'fwd+bwd':>9}")
    rows = []
    for routing in args.routing:
        for n in args.layers:
            cmd = [sys.executable, __file__, "--child", str(n), routing]
            cmd += ["--steps", str(args.steps), "--device", args.device, "--ci-fn", args.ci_fn]
            out = subprocess.run(cmd, capture_output=True, text=True)
            line = next((s for s in out.stdout.splitlines() if s.startswith("ROW ")), None)
            if line is None:
                print(f"{routing} {n}: failed (exit {out.returncode})\n{out.stderr[-2000:]}")
                continue
            row = json.loads(line[4:])
            rows.append(row)
            print(
                f"{routing:<10}{n:>7}{row['decomposed_modules']:>8}{row['ms_per_step']:>10.0f}"
                f"{row['target_fwd_bwd_ms']:>9.0f}  ×{row['step_over_fwd_bwd']:<5} "
                f"peak RSS {row['peak_rss_mb']:.0f} MB (model built: "
                f"{row['rss_after_model_mb']:.0f} MB)",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "arch": ARCH, "rows": rows}, f, indent=2)
    if args.figure and rows:
        figure(rows, args.figure)


if __name__ == "__main__":
    main()
