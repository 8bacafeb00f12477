"""
bench/bench_train.py: training speed of diffusion.py and gpt.py, side by side in one run, against
the matmul floor of this machine and (on CPU, when ../shared/reference exists) the two reference
implementations the project is compared with.

    python bench/bench_train.py                         # CPU: nanoGPT's CPU recipe size, 1 thread
    python bench/bench_train.py --steps=400 --reference_dir=''     # ours only
    python bench/bench_train.py --device=cuda           # config/fineweb_124m.py shapes, bf16 + compile

1. In this process: one training step (draws, loss, backward, clip, AdamW) of each objective on
   random tokens, and on CPU, when ../shared/reference is there, a step of nanoGPT's model.py (its
   GPT and optimizer, clip 1.0) and of the microDLM seed's diffusion.py (its batch, masks, model and
   AdamW), all alternating step by step so they see the same load; ms/step is the median over
   `steps`, and a table gives each reference's ms/step over each of ours. Also the number of graph
   breaks of each loss under torch._dynamo.explain and the number of compilations over 5 steps of
   different mask rates (should be 1).
2. The floor: the FLOPs of a step (Transformer.flops_per_token() x tokens) at this machine's
   measured matmul rate for the model's own shapes (forward and both backward products of each
   linear layer). ratio = ms/step / floor.
3. Whole processes (CPU): this project's diffusion.py and gpt.py, nanoGPT's train.py and the
   microDLM seed's diffusion.py, each run for N1 and N2 steps, cycling through the contenders so
   they share the machine's load; (T(N2) - T(N1)) / (N2 - N1) removes start-up, data and evaluation.
4. Where an eager CPU step's time goes (--profile, on by default): torch.profiler over 20 steps,
   by phase (forward, backward, clip, optimizer) and by kind of op (matrix products, attention, the
   rest, with the largest of the rest named).
On CUDA it also prints tokens/s, MFU (PEAK_FLOPS in diffusion.py) and peak memory.
"""
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)
import diffusion as D  # noqa: E402
import runtime as R  # noqa: E402
from gpt import GPTObjective  # noqa: E402

# -----------------------------------------------------------------------------
device = 'cpu'                  # 'cpu' | 'cuda' | 'auto'
config = ''                     # a config file for the model shapes; '' = nanoGPT's CPU recipe on CPU, config/fineweb_124m.py on CUDA
n_layer = 4                     # model size when config is '' on CPU (nanoGPT's CPU recipe)
n_head = 4
n_embd = 128
block_size = 64                 # tokens per sequence
batch_size = 12                 # sequences per step
vocab = 65                      # real tokens (Tiny Shakespeare's characters)
steps = 100                     # timed steps per objective in this process (after 10 warm-up steps)
threads = 1                     # torch CPU threads (0 = torch's default)
compile = False                 # also time the compiled loss in this process (always so on CUDA)
profile = True                  # also profile the eager step: where its time goes (phases, kinds of op)
processes = True                # also time whole processes (ours and, when present, the references)
n1 = 40                         # whole-process runs: steps of the short run
n2 = 240                        # ... and of the long run
repeats = 2                     # whole-process runs per contender and length (the median counts)
reference_dir = os.path.join(HERE, '..', 'shared', 'reference')   # nanoGPT/ and microDLM/; '' = skip them
text = os.path.join(HERE, '..', 'shared', 'data', 'tinyshakespeare.txt')   # the references' training text
seed = 1337
# -----------------------------------------------------------------------------


def model_settings(c, dev):
    """The model and batch shapes: a config file's, fineweb_124m's on CUDA, or the settings above."""
    path = c.config or (os.path.join(HERE, 'config', 'fineweb_124m.py') if dev.type == 'cuda' else '')
    s = R.Config(R.settings_of(vars(D)), n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd,
                 block_size=c.block_size, batch_size=c.batch_size, gradient_accumulation_steps=1, seed=c.seed,
                 compile=c.compile or dev.type == 'cuda', dropout=0.0)
    if path:
        s.update({k: v for k, v in R.read_config_file(path).items() if k in s})
        s.update(gradient_accumulation_steps=1, compile=c.compile or dev.type == 'cuda', dropout=0.0)
    return s


def matmul_rate(model, tokens, dev, seconds=2.0):
    """FLOP/s of the model's linear layers' three products (forward, input and weight gradients)."""
    shapes = []
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            n_out, n_in = m.weight.shape
            shapes += [(tokens, n_in, n_out), (tokens, n_out, n_in), (n_out, tokens, n_in)]
    mats = [(torch.randn(a, b, device=dev), torch.randn(b, cc, device=dev), torch.empty(a, cc, device=dev))
            for a, b, cc in shapes]
    flops = sum(2 * a * b * cc for a, b, cc in shapes)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or n < 3:
        for a, b, out in mats:
            torch.mm(a, b, out=out)
        if dev.type == 'cuda':
            torch.cuda.synchronize()
        n += 1
    return flops * n / (time.perf_counter() - t0)


def graph_report(objective, model, window, dev):
    """(graph breaks of the loss under torch._dynamo.explain, compilations over 5 steps)."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounter
    x, y = window[:, :-1], window[:, 1:]
    args = (lambda s: (model, x, *objective.draws(x, ('bench', s)))) if objective.name == 'diffusion' \
        else (lambda s: (model, x, y))
    fn = getattr(objective.compute, '_torchdynamo_orig_callable', objective.compute)
    torch._dynamo.reset()
    breaks = torch._dynamo.explain(fn)(*args(0)).graph_break_count
    counter = CompileCounter()
    compiled = torch.compile(fn, backend=counter, fullgraph=True)
    for s in range(5):
        compiled(*args(s)).backward()
    torch._dynamo.reset()
    return breaks, counter.frame_count


def train_step(model, opt, objective, window, step, autocast, mark=contextlib.nullcontext):
    """One training step as diffusion.py's loop takes it: loss, backward, clip, AdamW."""
    with mark('forward'), autocast:
        loss = objective.loss(model, window, step, 0)
    with mark('backward'):
        loss.backward()
    with mark('clip'):
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    with mark('optimizer'):
        opt.step()
        opt.zero_grad(set_to_none=True)


def time_alternating(steps, new_window, n, warmup, dev):
    """{name: median ms} of n steps of each contender after warmup ones: steps {name: f(window, step)},
    all on the same window at each step, in alternating order, so that every contender sees the
    same load."""
    times = {name: [] for name in steps}
    for step in range(warmup + n):
        window = new_window()
        for name in (list(steps) if step % 2 else list(steps)[::-1]):
            if dev.type == 'cuda':
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            steps[name](window, step)
            if dev.type == 'cuda':
                torch.cuda.synchronize()
            if step >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


def profile_steps(runs, windows, autocast):
    """Where an eager step's time goes, by torch.profiler: its phases, and its ops' own time by
    kind (matrix products, attention, the rest: norms, activations, RoPE, masking, the loss)."""
    from torch.profiler import ProfilerActivity, profile, record_function
    kinds = {'matmul': ('aten::mm', 'aten::addmm', 'aten::bmm', 'aten::addmv', 'aten::mv'),
             'attention': ('aten::_scaled_dot_product',)}
    phases = ('forward', 'backward', 'clip', 'optimizer')
    print(f"\nwhere an eager step's time goes (torch.profiler, {len(windows)} steps, ms/step; the profiler adds "
          "a little)")
    print(f"{'':<14}" + ''.join(f"{p:>10}" for p in phases) + f"{'|':>3}" + ''.join(f"{k:>10}" for k in kinds)
          + f"{'rest':>8}   largest of the rest")
    for name, (model, opt, objective) in runs.items():
        if '--compile' in name:
            continue
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for i, window in enumerate(windows):
                train_step(model, opt, objective, window, 10_000 + i, autocast, record_function)
        events = prof.key_averages()
        per = {e.key: e for e in events}
        n = len(windows)
        phase_ms = [per[p].cpu_time_total / 1000 / n if p in per else 0.0 for p in phases]
        ops = [e for e in events if e.key not in phases]
        kind_ms = {k: sum(e.self_cpu_time_total for e in ops if e.key.startswith(v)) / 1000 / n
                   for k, v in kinds.items()}
        rest = [e for e in ops if not any(e.key.startswith(v) for v in kinds.values())]
        rest_ms = sum(e.self_cpu_time_total for e in rest) / 1000 / n
        top = sorted(rest, key=lambda e: -e.self_cpu_time_total)[:4]
        print(f"{name:<14}" + ''.join(f"{v:>10.1f}" for v in phase_ms) + f"{'|':>3}"
              + ''.join(f"{v:>10.1f}" for v in kind_ms.values()) + f"{rest_ms:>8.1f}   "
              + ', '.join(f"{e.key.replace('aten::', '')} {e.self_cpu_time_total / 1000 / n:.1f}" for e in top))


def in_process(c, dev):
    s = model_settings(c, dev)
    meta = {'vocab_size': c.vocab if s.dataset == 'shakespeare_char' else 50257}   # GPT-2's for BPE configs
    runs, tokens = {}, s.batch_size * s.block_size
    variants = [(' --compile', True)] if dev.type == 'cuda' else [('', False)] + [(' --compile', True)] * s.compile
    for label, comp in variants:   # on CPU, eager and (with --compile) compiled, alternating
        for Objective in (D.DiffusionObjective, GPTObjective):
            torch.manual_seed(c.seed)
            model = D.Transformer(D.model_config(s, meta, Objective.causal)).to(dev)
            runs[f'{Objective.name}.py{label}'] = (model.train(), D.make_optimizer(model, s, dev),
                                                  Objective(R.Config(s, compile=comp), meta))
    model0 = runs[next(iter(runs))][0]
    print(f"model: {model0.num_params() / 1e6:.2f}M parameters ({s.n_layer} layers, {s.n_head} heads, "
          f"{s.n_embd} wide, {s.mlp}), batch {s.batch_size} x block {s.block_size}, vocab {meta['vocab_size']}, "
          f"{dev}, {torch.get_num_threads()} thread(s), compile={s.compile}")
    autocast = R.autocast_for(dev, 'auto')
    R.tune_backend(dev)   # as training sets it
    gen = torch.Generator().manual_seed(c.seed)
    steps = {name: (lambda window, step, run=run: train_step(*run, window, step, autocast)) for name, run in runs.items()}
    if dev.type == 'cpu' and meta['vocab_size'] == c.vocab:   # the references are char models
        work = tempfile.mkdtemp(prefix='bench_train_')   # the microDLM copy: read at once, then removed
        try:
            steps.update({name: (lambda window, step, f=f: f(window))
                          for name, f in reference_steps(c, s, work, s.compile).items()})
        finally:
            shutil.rmtree(work, ignore_errors=True)
    if dev.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(dev)
    ms = time_alternating(steps, lambda: R.to_device(
        torch.randint(0, meta['vocab_size'], (s.batch_size, s.block_size + 1), generator=gen), dev), c.steps, 10, dev)
    window = R.to_device(torch.randint(0, meta['vocab_size'], (s.batch_size, s.block_size + 1), generator=gen), dev)
    flops = model0.flops_per_token() * tokens
    rate = matmul_rate(model0, tokens, dev)
    floor = 1000 * flops / rate
    peak = R.peak_flops(dev)
    print(f"step: {flops / 1e9:.2f} GFLOP (6 x matmul weights + attention per token x {tokens} tokens); "
          f"matmul rate here at the model's shapes {rate / 1e9:.1f} GFLOP/s; floor {floor:.1f} ms/step")
    print(f"{'in this process':<28}{'ms/step':>10}{'x floor':>9}{'tokens/s':>12}" + (f"{'MFU':>8}" if peak else '')
          + f"{'graph breaks':>14}{'compiles/5 steps':>18}")
    for name in steps:
        if name in runs:
            model, _, objective = runs[name]
            breaks, compiles = graph_report(objective, model, window, dev) if dev.type != 'mps' else ('-', '-')
        else:
            breaks, compiles = '', ''
        mfu = f"{100 * flops / (ms[name] / 1000) / peak:>7.1f}%" if peak else ''
        print(f"{name:<28}{ms[name]:>10.1f}{ms[name] / floor:>9.2f}{tokens / ms[name] * 1000:>12,.0f}{mfu}"
              f"{breaks:>14}{compiles:>18}")
    ratios(ms, 'in this process')
    if dev.type == 'cuda':
        print(f"peak memory {torch.cuda.max_memory_allocated(dev) / 2**30:.2f} GiB")
    if c.profile and dev.type == 'cpu':
        profile_steps(runs, [torch.randint(0, meta['vocab_size'], (s.batch_size, s.block_size + 1), generator=gen)
                             for _ in range(20)], autocast)
    return floor


def contenders(c, work):
    """{name: (command for n steps, folder)}: ours, and the references when their folder exists."""
    ours = [f'--n_layer={c.n_layer}', f'--n_head={c.n_head}', f'--n_embd={c.n_embd}', f'--block_size={c.block_size}',
            f'--batch_size={c.batch_size}', '--device=cpu', '--eval_iters=1', '--sample_at_end=false',
            f'--data_dir={work}/data', '--log_interval=1000000', '--eval_interval=1000000']
    out = {f'{name}.py': (lambda n, name=name: [sys.executable, os.path.join(HERE, f'{name}.py'), *ours,
                                                f'--max_iters={n}', f'--out_dir={work}/out-{name}-{n}-{time.time_ns()}'],
                          work) for name in ('diffusion', 'gpt')}   # eager: compiling's own time is too noisy to subtract
    if has_reference(c, 'nanoGPT'):
        ng = os.path.join(work, 'nanoGPT')
        shutil.copytree(os.path.join(c.reference_dir, 'nanoGPT'), ng)
        shutil.copy(c.text, os.path.join(ng, 'data', 'shakespeare_char', 'input.txt'))
        subprocess.run([sys.executable, 'prepare.py'], cwd=os.path.join(ng, 'data', 'shakespeare_char'), check=True,
                       capture_output=True)
        out['nanoGPT train.py'] = (lambda n: [
            sys.executable, 'train.py', 'config/train_shakespeare_char.py', '--device=cpu', '--compile=False',
            '--eval_iters=1', '--log_interval=1000000', f'--block_size={c.block_size}', f'--batch_size={c.batch_size}',
            f'--n_layer={c.n_layer}', f'--n_head={c.n_head}', f'--n_embd={c.n_embd}', f'--max_iters={n}',
            f'--lr_decay_iters={n}', '--dropout=0.0', '--eval_interval=1000000', f'--out_dir={work}/ng-out'], ng)
    if has_reference(c, 'microDLM'):
        def micro(n):
            return [sys.executable, micro_dlm_copy(c, work, n), '--train']
        out['microDLM diffusion.py'] = (micro, os.path.join(work, 'microDLM'))
    return out


def has_reference(c, name):
    return bool(c.reference_dir) and os.path.isdir(os.path.join(c.reference_dir, name)) and os.path.exists(c.text)


def micro_dlm_copy(c, work, max_iters):
    """A scratch copy of the microDLM seed's diffusion.py at the bench's sizes, on the CPU, with the
    text beside it where it reads it (data/shakespeare.txt); returns its path. Its settings are
    globals at the top of the file (see ../shared/reference/README.md)."""
    md = os.path.join(work, 'microDLM')
    os.makedirs(os.path.join(md, 'data'), exist_ok=True)
    shutil.copy(c.text, os.path.join(md, 'data', 'shakespeare.txt'))
    src = open(os.path.join(c.reference_dir, 'microDLM', 'diffusion.py')).read()
    for k, v in (('batch_size', c.batch_size), ('block_size', c.block_size), ('eval_iters', 1),
                 ('eval_interval', 10 ** 6), ('n_embd', c.n_embd), ('n_head', c.n_head), ('n_layer', c.n_layer),
                 ('max_iters', max_iters)):
        src = src.replace(f"\n{k} = ", f"\n{k} = {v}  # bench; was ", 1)
    path = os.path.join(md, f'diffusion_{max_iters}.py')
    with open(path, 'w') as f:
        f.write(src.replace('device = (', "device = 'cpu' or (", 1))
    return path


def load_module(name, path):
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reference_steps(c, s, work, compiled):
    """{name: step(window)}: a training step of nanoGPT's model.py (its GPT, configure_optimizers and
    its recipe's clip at 1.0) and of the microDLM seed's diffusion.py (its get_batch, model and
    AdamW), built from their own files at the bench's sizes, for timing beside ours in this process
    (CPU, when ../shared/reference is there). compiled: also nanoGPT's model under torch.compile."""
    out = {}
    if has_reference(c, 'nanoGPT'):
        ng = load_module('nanogpt_model', os.path.join(c.reference_dir, 'nanoGPT', 'model.py'))
        for label, comp in [('', False)] + [(' --compile', True)] * compiled:
            torch.manual_seed(c.seed)
            with contextlib.redirect_stdout(None):   # it prints its parameter count and groups
                model = ng.GPT(ng.GPTConfig(block_size=s.block_size, vocab_size=c.vocab, n_layer=s.n_layer,
                                            n_head=s.n_head, n_embd=s.n_embd, dropout=0.0, bias=False))
                opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), 'cpu')
            fwd = torch.compile(model) if comp else model

            def step(window, model=model, fwd=fwd, opt=opt):
                _, loss = fwd(window[:, :-1].contiguous(), window[:, 1:].contiguous())   # as its get_batch gives them
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
            out[f'nanoGPT model.py{label}'] = step
    if has_reference(c, 'microDLM'):
        torch.manual_seed(c.seed)
        md = load_module('microdlm_diffusion', micro_dlm_copy(c, work, 1))
        model = md.DiffusionLM()
        opt = torch.optim.AdamW(model.parameters(), lr=md.learning_rate)

        def micro_step(window):   # its own batch and masks, as its loop draws them
            _, loss = model(*md.get_batch('train'))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        out['microDLM diffusion.py'] = micro_step
    return out


def ratios(ms, where):
    """A table of each reference's ms/step over each of ours (> 1: ours faster)."""
    ours = [k for k in ms if k.startswith(('diffusion.py', 'gpt.py'))]
    refs = [k for k in ms if k not in ours]
    if not refs:
        print(f"({where}: no reference implementations; --reference_dir and --text must exist)")
        return
    print(f"reference ms/step / ours ({where}; > 1: ours faster)")
    print(f"{'':<28}" + ''.join(f"{k:>24}" for k in ours))
    for ref in refs:
        print(f"{ref:<28}" + ''.join(f"{ms[ref] / ms[k]:>23.2f}x" for k in ours))


def whole_processes(c, floor):
    work = tempfile.mkdtemp(prefix='bench_train_')
    try:
        env = dict(os.environ, OMP_NUM_THREADS=str(c.threads or os.cpu_count()), PYTHONUNBUFFERED='1')
        subprocess.run([sys.executable, os.path.join(HERE, 'prepare.py'), f'--data_dir={work}/data',
                        *([f'--input={c.text}'] if os.path.exists(c.text) else [])], check=True, capture_output=True,
                       env=env)
        cmds = contenders(c, work)
        secs = {name: {c.n1: [], c.n2: []} for name in cmds}
        for _ in range(c.repeats):
            for n in (c.n1, c.n2):
                for name, (cmd, cwd) in cmds.items():  # cycling: every contender sees the same load
                    t0 = time.perf_counter()
                    r = subprocess.run(cmd(n), cwd=cwd, env=env, capture_output=True, text=True)
                    if r.returncode:
                        raise R.UserError(f"{name} failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
                    secs[name][n].append(time.perf_counter() - t0)
        print(f"\nwhole processes, (T({c.n2} steps) - T({c.n1} steps)) / {c.n2 - c.n1}, median of {c.repeats}, "
              f"{c.threads} thread(s) each")
        print(f"{'contender':<28}{'ms/step':>10}{'x floor':>9}")
        res = {}
        for name, t in secs.items():
            res[name] = 1000 * (statistics.median(t[c.n2]) - statistics.median(t[c.n1])) / (c.n2 - c.n1)
            print(f"{name:<28}{res[name]:>10.1f}{res[name] / floor:>9.2f}")
        ratios(res, 'whole processes')
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main():
    c = R.configure(globals(), rules={'device': R.one_of(('cpu', 'cuda', 'auto')), 'steps': R.at_least(1),
                                      'n1': R.at_least(1), 'repeats': R.at_least(1)}, verbose=False)
    if c.n2 <= c.n1:
        raise R.UserError("--n2 must be larger than --n1", R.EXIT_USAGE)
    if c.threads:
        torch.set_num_threads(c.threads)
    dev = R.resolve_device(c.device)
    print(f"load average {' '.join(f'{v:.1f}' for v in os.getloadavg())} on {os.cpu_count()} cores")
    floor = in_process(c, dev)
    if c.processes and dev.type == 'cpu':
        whole_processes(c, floor)


if __name__ == '__main__':
    R.run_cli(main)
