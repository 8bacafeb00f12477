"""The 124M study model: 12 layers, 12 heads, 768 wide, SwiGLU, tied embeddings, block 1024,
GPT-2 vocabulary 50257 + MASK padded to 50304. 1B FineWeb-Edu tokens in 1907 steps of
524,288 tokens (16 sequences x 1024 tokens x 32 micro-steps, split over the GPUs).
    python prepare.py --dataset=fineweb_edu
    torchrun --standalone --nproc_per_node=8 diffusion.py config/fineweb_124m.py
    sbatch slurm_train.sh config/fineweb_124m.py"""
dataset = 'fineweb_edu'
n_layer = 12
n_head = 12
n_embd = 768
mlp = 'swiglu'
tie_weights = True
block_size = 1024
batch_size = 16
gradient_accumulation_steps = 32
learning_rate = 6e-4
max_iters = 1907
warmup_iters = 100
weight_decay = 0.1
beta2 = 0.95
eval_interval = 250
eval_iters = 40
log_interval = 10
compile = True
