#!/usr/bin/env bash
# Evaluation time and peak memory of a one-layer decomposition of a ~110M-parameter GPT-2
# (random init, 12 layers, d_model 768, vocab 32000), before (REF) and after (the working
# tree): `spdkit eval RUN_DIR` on 32 sequences of 64 tokens, under /usr/bin/time.
#   bash benchmarks/eval_large_lm.sh            (OUT=/tmp/eval_large REF=5d7acd6 by default)
set -euo pipefail
OUT=${OUT:-/tmp/eval_large}
REF=${REF:-5d7acd6}
ROOT=$(pwd)
PY=$ROOT/.venv/bin/python
mkdir -p "$OUT"
if [ ! -d "$OUT/model" ]; then
  "$PY" - "$OUT/model" <<'PYEOF'
import sys, torch
from transformers import GPT2Config, GPT2LMHeadModel
torch.manual_seed(0)
cfg = GPT2Config(vocab_size=32000, n_positions=256, n_embd=768, n_layer=12, n_head=12,
                 bos_token_id=0, eos_token_id=0)
model = GPT2LMHeadModel(cfg)
print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")
model.save_pretrained(sys.argv[1])
PYEOF
fi
[ -d "$OUT/before_src" ] || git worktree add --detach "$OUT/before_src" "$REF" >/dev/null
SETS=(--set target.data=random_tokens --set "modules.0.pattern=transformer.h.0.mlp.*"
      --set eval.n_eval_samples=32 --set "eval.pgd_steps=[10]" --set batch_size=8)
for which in before after; do
  src=$ROOT/src
  [ "$which" = before ] && src=$OUT/before_src/src
  run=$OUT/run_$which
  [ -f "$run/summary.json" ] || PYTHONPATH=$src "$PY" -c "from spdkit.cli import main; main()" \
    run hf_lm --target-hf "$OUT/model" "${SETS[@]}" --steps 1 --out "$run" --quiet
  PYTHONPATH=$src /usr/bin/time -v "$PY" -c "from spdkit.cli import main; main()" eval "$run" \
    > "$OUT/eval_$which.log" 2> "$OUT/eval_$which.time"
  echo "$which: $(grep -E 'Elapsed|Maximum resident|System time' "$OUT/eval_$which.time" | tr -s ' ' | tr '\n' ';')"
done
