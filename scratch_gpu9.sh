#!/bin/bash
export PYTHONPATH=/tmp/site ATTNC_CACHE_DIR=/tmp/ac PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
export OMP_NUM_THREADS=16
M=/tmp/gg/SmolLM2-135M-Instruct.Q4_1.gguf
C="--model $M --device cuda --length 4096 --sequences 37 --stride 1024 --retrieval 40 --retrieval-filler both --d-gate 128 --eval direct"
timeout 150 python3 benchmarks/gate.py $C --steps 300 --seed 0 --configs all:d0.178 --out /tmp/K0 > /tmp/K0.log 2>&1
grep -E '^\{"name|^\[' /tmp/K0.log | cut -c1-200
G=/tmp/K0/bench.gates.safetensors
F="--gates $G --configs all:d0.178 all:d0.18 all:d0.182 all:e0.186 all:e0.188 all:e0.189 all:e0.19 all:e0.192 --finetune 400 --finetune-seconds $1"
timeout $2 python3 benchmarks/gate.py $C $F --finetune-lr 1e-4 --finetune-distill 1.0 --finetune-density 0.19 --out /tmp/F9 > /tmp/F9.log 2>&1
echo "== F9"; grep -E '^finetune|^\[' /tmp/F9.log | cut -c1-600 | awk 'NR%3==1'; grep -E '^\{"name' /tmp/F9.log | cut -c1-200; tail -2 /tmp/F9.log | cut -c1-300; cp /tmp/F9/results.json $OUT/F9.json
split -b 16000000 -d /tmp/F9/finetuned.gates.safetensors $OUT/f9part_; sha256sum /tmp/F9/finetuned.gates.safetensors
