"""
bench/bench_arch.py: what each of the model's own ops costs in an eager CPU training step, against
the plainer choices of nanoGPT's model, measured in one process, variant by variant, step by step.

    python bench/bench_arch.py                 # nanoGPT's CPU recipe size, 1 thread (~2 min)

Variants (each a different model, the same diffusion step): ours; without QK-norm; without RoPE;
GELU in place of ReLU²; none of the three. The ops are swapped in diffusion.py's own names
(rms_norm of q and k, apply_rope, ReLUSquared) around each step, so the model code is unchanged.
Prints the median ms/step of each and its difference from ours.
"""
import contextlib
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_train import D, R, time_alternating, train_step  # noqa: E402  (bench_train puts the repo on the path)

# -----------------------------------------------------------------------------
n_layer = 4                     # nanoGPT's CPU recipe
n_head = 4
n_embd = 128
block_size = 64                 # tokens per sequence
batch_size = 12                 # sequences per step
steps = 200                     # timed steps per variant (after 30 warm-up steps)
threads = 1                     # torch CPU threads
seed = 1337
# -----------------------------------------------------------------------------


class GELU:
    apply = staticmethod(F.gelu)


def no_qk_norm(x, weight, eps=1e-6, norm=D.rms_norm):
    return x if weight.dim() == 3 else norm(x, weight, eps)   # q and k's stacked weight is (2, 1, D)


VARIANTS = {'ours': {},
            'no QK-norm': {'rms_norm': no_qk_norm},
            'no RoPE': {'apply_rope': lambda x, cos, sin: x},
            'GELU for ReLU2': {'ReLUSquared': GELU},
            'none of the three': {'rms_norm': no_qk_norm, 'apply_rope': lambda x, cos, sin: x, 'ReLUSquared': GELU}}


def main():
    c = R.configure(globals(), rules={'steps': R.at_least(1), 'threads': R.at_least(1)}, verbose=False)
    torch.set_num_threads(c.threads)
    dev = torch.device('cpu')
    R.tune_backend(dev)
    s = R.Config(R.settings_of(vars(D)), n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, block_size=c.block_size,
                 batch_size=c.batch_size, gradient_accumulation_steps=1, seed=c.seed, compile=False, dropout=0.0)
    meta = {'vocab_size': 65}
    runs = {}
    for name in VARIANTS:
        torch.manual_seed(c.seed)
        model = D.Transformer(D.model_config(s, meta, False)).train()
        runs[name] = (model, D.make_optimizer(model, s, dev), D.DiffusionObjective(s, meta))
    own = {k: getattr(D, k) for k in ('rms_norm', 'apply_rope', 'ReLUSquared')}

    def step_of(name):
        def step(window, i):
            for k, v in {**own, **VARIANTS[name]}.items():   # this variant's ops, in diffusion.py's names
                setattr(D, k, v)
            train_step(*runs[name], window, i, contextlib.nullcontext())
        return step
    gen = torch.Generator().manual_seed(c.seed)
    try:
        ms = time_alternating({name: step_of(name) for name in runs}, lambda: torch.randint(
            0, meta['vocab_size'], (s.batch_size, s.block_size + 1), generator=gen), c.steps, 30, dev)
    finally:
        for k, v in own.items():
            setattr(D, k, v)
    print(f"eager diffusion step, {c.n_layer} layers, {c.n_embd} wide, batch {c.batch_size} x block {c.block_size}, "
          f"{c.threads} thread(s); median of {c.steps} steps each, alternating")
    for name, v in ms.items():
        print(f"{name:<20}{v:>8.1f} ms/step{v - ms['ours']:>+8.1f} ms vs ours")


if __name__ == '__main__':
    R.run_cli(main)
