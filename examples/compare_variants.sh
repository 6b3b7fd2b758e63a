#!/usr/bin/env bash
# GRPO and its successors (DAPO, GSPO, SAPO, Dr. GRPO: presets in configs/) on the default task,
# all from the same SFT warm start, their curves on one figure (docs/variants.png by default).
#
#   bash examples/compare_variants.sh                    # runs/variants/{grpo,dapo,gspo,sapo,dr_grpo}
#   RUNS=runs/v2 OUT=v2.png bash examples/compare_variants.sh train.total_steps=50
#
# Every run takes two updates per rollout (grpo.num_minibatches=2): the second update is off-policy,
# so the ratio leaves 1 and the clipping / gating rules act; with a single on-policy update the
# PPO clip, GSPO and SAPO all give the same gradient.
set -euo pipefail
RUNS=${RUNS:-runs/variants} OUT=${OUT:-docs/variants.png}
COMMON=(grpo.num_minibatches=2 train.total_steps=100 train.eval_every=20 train.checkpoint_every=0 "$@")

python train.py --config configs/grpo.yaml run_dir="$RUNS/grpo" "${COMMON[@]}"
for variant in dapo gspo sapo dr_grpo; do
  mkdir -p "$RUNS/$variant"
  [ -d "$RUNS/$variant/sft_warmup" ] || cp -r "$RUNS/grpo/sft_warmup" "$RUNS/$variant/"  # reused, not retrained
  python train.py --config "configs/$variant.yaml" run_dir="$RUNS/$variant" "${COMMON[@]}"
done
python -m jaxrl_llm.plot "$RUNS"/{grpo,dapo,gspo,sapo,dr_grpo} -o "$OUT" \
  --metrics reward/mean,eval/accuracy,response_length/mean,clipfrac/low,clipfrac/high,kl \
  --title "GRPO variants on one-digit addition (tiny model, same SFT warm start)"
