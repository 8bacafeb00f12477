"""The 10.7M-parameter character model on Tiny Shakespeare (nanoGPT's shakespeare_char size).
6 layers, 6 heads, 384 wide, ReLU^2 MLP, block 256. About 10 minutes on one A100/H100 in bf16.
    python prepare.py && python diffusion.py config/char_10m.py
    python gpt.py config/char_10m.py          # the same model as a GPT"""
dataset = 'shakespeare_char'
n_layer = 6
n_head = 6
n_embd = 384
mlp = 'relu2'
block_size = 256
batch_size = 64
dropout = 0.2
learning_rate = 1e-3
max_iters = 5000
warmup_iters = 100
beta2 = 0.99
eval_interval = 250
eval_iters = 200
log_interval = 10
compile = True
