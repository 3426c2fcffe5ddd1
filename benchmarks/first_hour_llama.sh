#!/usr/bin/env bash
# The first-hour check of issue 34 on a Llama-family model of SmolLM-135M's shape (30 layers,
# d_model 576, MLP 1536, 9 heads / 3 KV heads, vocab 49152, tied embeddings; random init: no
# pretrained weights are reachable from this machine) with a byte-level BPE tokenizer trained on
# the pydoc text, saved with save_pretrained. Then, as a user would:
#   spdkit run hf_lm --target-hf MODEL --steps 3
# and prints: seconds from the command to the first training step, to the end of training, and
# of the evaluation; the all-ones-mask KL; the run directory's size; peak RSS.
#   bash benchmarks/first_hour_llama.sh            (OUT=/tmp/first_hour by default)
set -euo pipefail
OUT=${OUT:-/tmp/first_hour}
PY=$(pwd)/.venv/bin/python
SPDKIT=$(pwd)/.venv/bin/spdkit
mkdir -p "$OUT"
if [ ! -f "$OUT/model/config.json" ]; then
  "$PY" - "$OUT/model" <<'PYEOF'
import sys

import pydoc_data.topics
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

torch.manual_seed(0)
tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
trainer = trainers.BpeTrainer(vocab_size=8192, special_tokens=["<|endoftext|>"])
tok.train_from_iterator(pydoc_data.topics.topics.values(), trainer)
fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                  num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                  max_position_embeddings=2048, tie_word_embeddings=True,
                  bos_token_id=0, eos_token_id=0)
model = LlamaForCausalLM(cfg)
print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters (tied counted once)")
model.save_pretrained(sys.argv[1])
fast.save_pretrained(sys.argv[1])
PYEOF
fi
rm -rf "$OUT/run"
start=$(date +%s.%N)
# every output line stamped with the seconds since the start (progress bars end lines with \r)
PYTHONUNBUFFERED=1 /usr/bin/time -v -o "$OUT/time.txt" "$SPDKIT" run hf_lm --target-hf "$OUT/model" --steps 3 \
    --out "$OUT/run" 2>&1 | stdbuf -oL tr '\r' '\n' | while IFS= read -r line; do
  printf '%7.1f %s\n' "$(echo "$(date +%s.%N) - $start" | bc)" "$line"
done > "$OUT/run.log"
stamp() { grep -m1 -E "$1" "$OUT/run.log" | awk '{print $1}'; }
last() { grep -E "$1" "$OUT/run.log" | tail -1 | awk '{print $1}'; }
echo "to the first step: $(stamp 'spd: .* 1/3') s; training done at $(last 'spd: .* 3/3') s;" \
  "summary at $(stamp '== spdkit summary') s (evaluation: the difference)"
"$PY" - "$OUT/run" <<'PYEOF'
import json, sys
s = json.load(open(f"{sys.argv[1]}/summary.json"))
print(f"training: {s['timing']['train_seconds']:.1f} s; all-ones KL {s['lm']['ones']['kl']:.2e}, "
      f"CI-masked KL {s['lm']['ci']['kl']:.3f}")
PYEOF
grep -E "Elapsed|Maximum resident" "$OUT/time.txt"
echo "run directory: $(du -sh "$OUT/run" | cut -f1) ($(ls "$OUT/run" | tr '\n' ' '))"
