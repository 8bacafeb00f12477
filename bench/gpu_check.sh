#!/usr/bin/env bash
# bench/gpu_check.sh: the GPU path in one command, for a person with an NVIDIA GPU (about 10 min).
#
#   bash bench/gpu_check.sh                 # from the repo root, in the project's environment
#
# 1. bench/bench_train.py in bf16 + torch.compile on one GPU, for the 10.7M char model
#    (config/char_10m.py) and the 124M model (config/fineweb_124m.py): ms/step, tokens/s, MFU and
#    peak memory of both objectives, graph breaks and compilations of each loss.
# 2. The real scripts on a dataset of random GPT-2 tokens (no download): diffusion.py and gpt.py
#    with config/fineweb_124m.py for STEPS steps each (log lines with tokens/s and MFU), then
#    2-process DDP under torchrun when there are 2 GPUs or more.
# Nothing is written outside a temporary folder, which is removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
STEPS=${STEPS:-300}
command -v nvidia-smi >/dev/null && nvidia-smi -L || true
"$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: no CUDA device here')"

echo "== 1. one training step, in process (bench/bench_train.py)"
"$PYTHON" bench/bench_train.py --device=cuda --config=config/char_10m.py --steps=100 --processes=false
"$PYTHON" bench/bench_train.py --device=cuda --config=config/fineweb_124m.py --steps=50 --processes=false

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PYTHON" - "$work" <<'PY'
import json, os, sys
import numpy as np
root = os.path.join(sys.argv[1], 'random_bpe')
os.makedirs(root)
rng = np.random.default_rng(0)
splits = {}
for split, n in (('train', 50_000_000), ('val', 1_000_000)):
    rng.integers(0, 50257, n, dtype=np.uint16).tofile(os.path.join(root, f'{split}.bin'))
    splits[split] = {'shards': [f'{split}.bin'], 'tokens': [n]}
json.dump({'dataset': 'random_bpe', 'tokenizer': 'gpt2', 'vocab_size': 50257, 'eot_id': 50256, 'dtype': 'uint16',
           'splits': splits}, open(os.path.join(root, 'meta.json'), 'w'))
PY
common=(config/fineweb_124m.py --data_dir="$work" --dataset=random_bpe --max_iters="$STEPS" --eval_interval="$STEPS"
        --eval_iters=5 --log_interval=25 --warmup_iters=20 --sample_at_end=false)
for script in diffusion.py gpt.py; do
    echo "== 2. $script, 1 GPU, $STEPS steps (global batch: gradient_accumulation_steps=32 micro-batches of 16 x 1024)"
    "$PYTHON" "$script" "${common[@]}" --out_dir="$work/$script-1gpu" | grep -E "^step|parameters" | tail -6
done
ngpu=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")
if [ "$ngpu" -ge 2 ]; then
    echo "== 3. diffusion.py under torchrun, 2 GPUs, default split of the global batch"
    "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node=2 diffusion.py "${common[@]}" \
        --out_dir="$work/ddp" | grep -E "^step|parameters" | tail -6
else
    echo "== 3. skipped: 2-process DDP needs 2 GPUs ($ngpu here)"
fi
