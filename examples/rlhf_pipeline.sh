#!/usr/bin/env bash
# The RLHF pipeline of the seed design on the synthetic preference task, whose hidden preference
# is "more letters 'a'": SFT -> reward model -> PPO, and DPO from the same SFT model on the same
# pairs. Checkpoints pass from stage to stage by path; then every policy is evaluated on the same
# held-out prompts (RM score and true hidden-preference rate) and the curves are drawn.
#
#   bash examples/rlhf_pipeline.sh            # runs/rlhf/{sft,rm,ppo,dpo}, runs/rlhf/rlhf.png
#   RUNS=runs/other bash examples/rlhf_pipeline.sh seed=1   # extra overrides go to every stage
set -euo pipefail
RUNS=${RUNS:-runs/rlhf}
SFT=$RUNS/sft/hf RM=$RUNS/rm/hf

python train.py --config configs/sft.yaml run_dir="$RUNS/sft" "$@"
python train.py --config configs/rm.yaml run_dir="$RUNS/rm" model.source="$SFT" "$@"
python train.py --config configs/ppo.yaml run_dir="$RUNS/ppo" model.source="$SFT" model.reward_model_path="$RM" "$@"
python train.py --config configs/dpo.yaml run_dir="$RUNS/dpo" model.source="$SFT" "$@"

# The same held-out prompts for each policy, 4 answers each sampled at PPO's temperature, scored by
# the reward model (reward_model) and by the hidden preference itself (preference_score).
for run in sft ppo dpo; do
  python -m jaxrl_llm.eval "$RUNS/$run" --config configs/ppo.yaml model.source="$SFT" model.reward_model_path="$RM" \
    --temperature 0.7 --n 4 "$@"
done
python -m jaxrl_llm.plot "$RUNS"/{rm,ppo,dpo} -o "$RUNS/rlhf.png" \
  --metrics eval/accuracy,loss,score/mean,kl,entropy,response_length/mean \
  --title "RM and DPO: held-out pair accuracy; PPO: RM score of its samples, KL to the SFT model"
