#!/bin/bash
# How docs/results/sae_budget_curve/ was made (run from the repository root; about 2.5 h on one CPU thread).
# 1. A trunk with the shipped SAEs' options (layers 15 and 24 only: the same data order, init seeds and schedule),
#    keeping its state at 0.8 T for each budget T; stop it (Ctrl-C) once checkpoint-16xxxxx.pt exists.
# 2. Each budget T resumes a copy of the state kept at 0.8 T with --tokens T: its own learning-rate decay.
# 3. eval-sae on each budget's SAEs (the shipped SAEs' evaluation sets), sst2 accuracy alone, then the fit.
set -e
R=runs/curve
OPTS="--corpus chatmix --layers 15,24 --width 4608 --k 32 --lr 5e-4 --model-dtype bfloat16 --save-dtype float16 --eval-tokens 4k --eval-batch 8 --threads 1 --seed 0"
G=".venv/bin/gradsae"
$G train-sae $OPTS --tokens 3M --keep-checkpoints 100k,200k,400k,800k,1.6M --out $R/trunk || true  # Ctrl-C after 1.6M
for pair in 125k:1 250k:2 500k:4 1M:8 2M:16; do
  T=${pair%%:*}; mark=${pair##*:}
  mkdir -p $R/b$T && cp $R/trunk/chat_replies.json $R/b$T/
  cp $(ls $R/trunk/checkpoint-${mark}*.pt | head -1) $R/b$T/checkpoint.pt
  $G train-sae $OPTS --tokens $T --out $R/b$T
done
mkdir -p $R/bw1M && cp $R/trunk/chat_replies.json $R/bw1M/
$G train-sae ${OPTS/--width 4608/--width 9216} --lr 3.5e-4 --tokens 1M --out $R/bw1M  # twice the width, lr / sqrt(2)
mkdir -p $R/bk64 && cp $R/trunk/chat_replies.json $R/bk64/
$G train-sae ${OPTS/--k 32/--k 64} --tokens 1M --out $R/bk64  # twice the L0
for T in 125k 250k 500k 1M 2M w1M k64; do
  $G eval-sae --layers 15,24 --out $R/e$T --tokens 3000 --n-task 0 --tasks sst2,capitals,plural,past_tense,facts --sae "$R/b$T/layer_{layer}" --threads 1
  $G eval-sae --layers 15,24 --out $R/a$T --tokens 0 --n-task 32 --tasks sst2 --sae "$R/b$T/layer_{layer}" --threads 1
done
.venv/bin/python scripts/sae_budget_curve.py $(for T in 125k 250k 500k 1M 2M; do echo --point $T=$R/e$T/eval_sae.json; done) \
  --point 3M=docs/results/eval_sae_shipped/eval_sae.json --other "9216 latents:1M=$R/ew1M/eval_sae.json" --other "k = 64:1M=$R/ek64/eval_sae.json" \
  --shape "4608 latents, k = 32 (x: 9216 latents; +: k = 64)" --out docs/results/sae_budget_curve
