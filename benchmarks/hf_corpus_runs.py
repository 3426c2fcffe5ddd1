"""Hugging Face models on corpora on disk, end to end through the command line.

    python benchmarks/hf_corpus_runs.py [--out DIR] [--steps N]

Writes the pydoc text shipped with Python as a corpus in three formats (a folder of .txt
documents, a .jsonl file, a .parquet file), trains a byte-pair tokenizer on it offline
(`tokenizers`), saves three random-init 4-layer models with that tokenizer
(`save_pretrained`): LlamaForCausalLM, GPT2LMHeadModel and a BertModel encoder, then runs
`spdkit run hf_lm --target-hf DIR --set target.data.path=...` once per model (Llama on .txt,
GPT-2 on .jsonl, BERT on .parquet with `target.output=last_hidden_state`, `output_loss=mse`)
and prints what each run directory's summary.json says.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

VOCAB = 2000
N_LAYERS, D_MODEL, D_MLP, HEADS = 4, 128, 512, 4


def write_corpus(root: Path) -> dict[str, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from spdkit.targets.text import corpus_text

    docs = [d.strip() for d in corpus_text().split("\n\n\n") if len(d.strip()) > 200]
    (root / "txt").mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(docs):
        (root / "txt" / f"doc{i:04d}.txt").write_text(doc)
    with (root / "corpus.jsonl").open("w") as f:
        for i, doc in enumerate(docs):
            f.write(json.dumps({"id": i, "text": doc}) + "\n")
    pq.write_table(pa.table({"text": docs}), root / "corpus.parquet")
    print(f"corpus: {len(docs)} documents, {sum(map(len, docs)):,} characters")
    return {
        "text": root / "txt",
        "jsonl": root / "corpus.jsonl",
        "parquet": root / "corpus.parquet",
    }


def tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<eos>", "<pad>"])
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<pad>"
    )


def models() -> dict:
    import torch
    from transformers import (
        BertConfig,
        BertModel,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    torch.manual_seed(0)
    common = {"vocab_size": VOCAB, "bos_token_id": 1, "eos_token_id": 1, "pad_token_id": 2}
    return {
        "llama": LlamaForCausalLM(
            LlamaConfig(
                hidden_size=D_MODEL,
                intermediate_size=D_MLP,
                num_hidden_layers=N_LAYERS,
                num_attention_heads=HEADS,
                num_key_value_heads=HEADS // 2,
                max_position_embeddings=256,
                **common,
            )
        ),
        "gpt2": GPT2LMHeadModel(
            GPT2Config(n_embd=D_MODEL, n_layer=N_LAYERS, n_head=HEADS, n_positions=256, **common)
        ),
        "bert": BertModel(
            BertConfig(
                hidden_size=D_MODEL,
                num_hidden_layers=N_LAYERS,
                num_attention_heads=HEADS,
                intermediate_size=D_MLP,
                max_position_embeddings=256,
                **common,
            )
        ),
    }


RUNS = {  # model -> (corpus format, module pattern, extra --set)
    "llama": ("text", "*.mlp.*", []),
    "gpt2": ("jsonl", "*.mlp.*", []),
    "bert": (
        "parquet",
        "*.intermediate.dense",
        ["target.output=last_hidden_state", "output_loss=mse"],
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/hf_corpus_runs"))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--models", default="llama,gpt2,bert", help="comma-separated subset")
    args = parser.parse_args()
    corpora = write_corpus(args.out / "corpus")
    texts = [p.read_text() for p in sorted(corpora["text"].glob("*.txt"))]
    tok = tokenizer(texts)
    for name, model in models().items():
        model.save_pretrained(args.out / "models" / name)
        tok.save_pretrained(args.out / "models" / name)
        n = sum(p.numel() for p in model.parameters())
        print(f"{name}: {type(model).__name__}, {n / 1e6:.2f}M parameters")
    for name, (fmt, pattern, extra) in RUNS.items():
        if name not in args.models.split(","):
            continue
        run_dir = args.out / "runs" / name
        sets = [f"target.data.path={corpora[fmt]}", f"modules.0.pattern={pattern}"]
        sets += ["modules.0.C=128", "eval.n_eval_samples=64", "eval.pgd_steps=[20]", *extra]
        cmd = [sys.executable, "-c", "from spdkit.cli import main; main()", "run", "hf_lm"]
        cmd += ["--target-hf", str(args.out / "models" / name), "--out", str(run_dir)]
        cmd += ["--steps", str(args.steps), "--quiet"] + [a for s in sets for a in ("--set", s)]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{name}: exit {done.returncode}\n{done.stderr[-2000:]}")
            continue
        summary = json.loads((run_dir / "summary.json").read_text())
        figures = sorted(p.name for p in (run_dir / "figures").glob("*.png"))
        line = {
            "model": name,
            "corpus": fmt,
            "wall_s": round(time.perf_counter() - t0, 1),
            "ms_per_step": summary["timing"]["ms_per_step"],
            "modules": len(summary["modules"]),
            "L0": round(sum(summary["mean_ci_l0"].values()), 1),
            "output_losses": {k: round(v, 4) for k, v in summary["output_losses"].items()},
            "figures": len(figures),
        }
        if "lm" in summary:
            lm = summary["lm"]
            line["CE target / ci / stochastic"] = [
                round(lm[k]["ce"], 3) for k in ("target", "ci", "stochastic")
            ]
            line["KL ci / stochastic / pgd_20"] = [
                round(lm[k]["kl"], 4) for k in ("ci", "stochastic", "pgd_20")
            ]
        print(json.dumps(line))


if __name__ == "__main__":
    main()
