#!/usr/bin/env bash
# The docs/align.md demo: GRPO, reward model + PPO, and DPO on the sort-words task, from an SFT model.
#   bash examples/align_demo.sh SFT_MODEL_DIR [OUT=out/align]
# Every run uses 1 CPU thread (fastest on a shared, loaded CPU); set LLMKIT="python -m llmkit" to run from a checkout.
# Rollouts sample at temperature 0.5: at T=1 the undertrained SFT model's samples are right 8% of the time
# (greedy: ~55%), so most GRPO groups carry no signal (docs/log.md).
set -euo pipefail
SFT=$1; OUT=${2:-out/align}; LLMKIT=${LLMKIT:-llmkit}; PY=${PY:-python}
export OMP_NUM_THREADS=1
mkdir -p "$OUT"
$PY examples/align_task.py prompts --data out/sort/train.jsonl --out "$OUT/prompts.jsonl"
$PY examples/align_task.py prompts --data out/sort/val.jsonl --out "$OUT/val_prompts.jsonl"
$PY examples/sft_task.py eval --model "$SFT" --data out/sort/val.jsonl | tee "$OUT/eval_sft.txt"

# GRPO with the exact-match reward
( $LLMKIT grpo --model "$SFT" --reward examples.align_task:reward --prompts "$OUT/prompts.jsonl" \
    --val-prompts "$OUT/val_prompts.jsonl" --eval-prompts 100 --out "$OUT/grpo" --group-size 8 --batch-size 16 \
    --temperature 0.5 --max-new-tokens 16 --max-steps ${GRPO_STEPS:-5000} --max-minutes ${GRPO_MINUTES:-14} \
    --eval-interval 100 --lr ${GRPO_LR:-6e-5} --beta 0 --loss-type dapo --num-threads 1 --overwrite --no-progress \
    > "$OUT/grpo.log" 2>&1
  $PY examples/sft_task.py eval --model "$OUT/grpo" --data out/sort/val.jsonl | tee "$OUT/eval_grpo.txt" ) &

# preference pairs from the checker: chosen = the right answer, rejected = the SFT model's own mistake
$PY examples/align_task.py prefs --model "$SFT" --data out/sort/train.jsonl --limit ${PAIRS:-2000} --out "$OUT/prefs.jsonl"
$PY examples/align_task.py prefs --data out/sort/val.jsonl --limit 100 --out "$OUT/val_prefs.jsonl" --model "$SFT"
# the reward model also sees the right answer with one word substituted (still sorted): without these pairs it
# scores such answers highest and PPO climbs toward them (docs/align.md, fourth session)
$PY examples/align_task.py prefs --model "$SFT" --data out/sort/train.jsonl --limit ${PAIRS:-2000} --substitutes 1 \
    --out "$OUT/rm_prefs.jsonl"
$PY examples/align_task.py prefs --data out/sort/val.jsonl --limit 100 --substitutes 1 --out "$OUT/rm_val_prefs.jsonl" \
    --model "$SFT"

# DPO on the pairs, with the RPO term (the chosen answers' NLL) that keeps their likelihood up
( $LLMKIT dpo --model "$SFT" --data "$OUT/prefs.jsonl" --val-data "$OUT/val_prefs.jsonl" --out "$OUT/dpo" \
    --beta 0.1 --rpo-alpha ${RPO:-1.0} --lr ${DPO_LR:-1e-4} --batch-size 8 --max-steps ${DPO_STEPS:-150} \
    --eval-interval 25 --precompute-ref --num-threads 1 --overwrite --no-progress > "$OUT/dpo.log" 2>&1
  $PY examples/sft_task.py eval --model "$OUT/dpo" --data out/sort/val.jsonl | tee "$OUT/eval_dpo.txt" ) &

# reward model on those pairs, then PPO against it (separate zero-initialised critic, whitened rewards)
$LLMKIT rm train --model "$SFT" --data "$OUT/rm_prefs.jsonl" --val-data "$OUT/rm_val_prefs.jsonl" --out "$OUT/rm" \
    --lr 3e-4 --batch-size 16 --max-steps ${RM_STEPS:-500} --eval-interval 100 --num-threads 1 --overwrite \
    --no-progress > "$OUT/rm.log" 2>&1
$LLMKIT ppo --model "$SFT" --reward "$OUT/rm" --prompts "$OUT/prompts.jsonl" --val-prompts "$OUT/val_prompts.jsonl" \
    --eval-prompts 100 --out "$OUT/ppo" --group-size 8 --batch-size 16 --temperature 0.5 --max-new-tokens 16 \
    --max-steps ${PPO_STEPS:-2000} --max-minutes ${PPO_MINUTES:-12} --eval-interval 50 --lr ${PPO_LR:-3e-5} \
    --kl-coef 0.2 --ppo-epochs 1 --num-minibatches 1 --value-model policy --whiten-rewards --value-warmup-steps 10 \
    --num-threads 1 --overwrite --no-progress > "$OUT/ppo.log" 2>&1
$PY examples/sft_task.py eval --model "$OUT/ppo" --data out/sort/val.jsonl | tee "$OUT/eval_ppo.txt"
wait
