"""
visualize.py: the race. The diffusion model reveals tokens everywhere at once in a few dozen
steps while GPT types left to right, one forward pass per token.

    python visualize.py                                    # the default run folders of diffusion.py and gpt.py
    python visualize.py --diffusion_dir=out/d --gpt_dir=out/g --steps=32 --length=256
    python visualize.py --no_animate > race.txt            # final frames only (always so in a pipe)
    python visualize.py --export=web/frames.json           # then open web/index.html (file:// is fine)
    python visualize.py --gif=race.gif --mp4=race.mp4      # Pillow; ffmpeg on the PATH for the MP4

Both models sample here and now, from their checkpoints, through sample.frames (the samplers
sample.py and evaluate.py use); nothing is recorded ahead of time or invented. Each model
first runs two frames as a warm-up (CUDA context, kernels, allocator) so that neither pays
start-up costs; then it samples once, every frame kept with the model's elapsed time (our
bookkeeping, the copy of the tokens to the CPU, is excluded) and the number of forward passes
(counted by a hook on the model, so a sampler that calls the model twice per step shows it).
The two recordings are then replayed on one clock, scaled so the race lasts --duration
seconds; the clocks on screen are the measured ones.
"""
import bisect
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import time
import unicodedata
from dataclasses import dataclass, field

import torch

import diffusion
import sample
from runtime import (EXIT_USAGE, Config, Tokenizer, UserError, at_least, atomic_write_text, ckpt_file, configure,
                     one_of, resolve_device, run_cli, settings_of)

# -----------------------------------------------------------------------------
diffusion_dir = ''              # diffusion run folder (holds ckpt.pt); '' = diffusion.py's default out_dir
gpt_dir = ''                    # GPT run folder; '' = gpt.py's default out_dir
diffusion_only = False          # race the diffusion model alone
gpt_only = False                # race the GPT model alone
sampler = sample.sampler        # diffusion sampler: one of sample.SAMPLERS (default: sample.py's)
steps = 64                      # diffusion denoising steps (per window of block_size tokens, or per block)
length = 0                      # tokens each model generates; 0 = as many as the smaller block_size allows
start = ''                      # prompt for both models ('' = none: GPT starts from one token); [MASK:N] infills
temperature = 1.0               # sampling temperature; 0 = greedy
top_k = 0                       # keep the k most likely tokens; 0 = all
top_p = 1.0                     # nucleus sampling mass; 1.0 = all
seed = 1337                     # sampling seed (the same for both models)
script = ''                     # .py files you trust to rebuild the checkpoints (comma-separated): see sample.py --help
device = 'auto'                 # 'auto' | 'cpu' | 'cuda' | 'mps'
no_animate = False              # print the final frames only (always so when stdout is not a terminal)
fps = 20                        # frames per second of the terminal animation, the GIF and the MP4
duration = 5.0                  # seconds the replay lasts (the clocks shown stay real); 0 = real time
width = 0                       # columns; 0 = the terminal's, at most 80 (80 when not a terminal)
export = ''                     # PATH.json: write the race as PATH.json and PATH.js for web/index.html
gif = ''                        # PATH.gif: write an animated GIF (needs Pillow)
mp4 = ''                        # PATH.mp4: write a video (needs Pillow, and ffmpeg on the PATH)
# -----------------------------------------------------------------------------

MASK_CHAR = '_'         # what a masked position looks like, in the terminal, GIF and web page alike
HOLD_SECONDS = 2.0      # the GIF and MP4 hold the final frame this long
FORMAT = 'diffusion-race/1'
# SGR parameters per style; 'text' is unstyled
ANSI = {'head': '1', 'prompt': '36', 'mask': '2', 'new': '1;30;43', 'dim': '2', 'win': '1;32'}
# RGB per style for the GIF and MP4: (foreground, background or None)
RGB = {'text': ((220, 220, 220), None), 'head': ((255, 255, 255), None), 'prompt': ((110, 200, 255), None),
       'mask': ((95, 95, 95), None), 'new': ((20, 20, 20), (255, 200, 50)), 'dim': ((140, 140, 140), None),
       'win': ((110, 240, 110), None)}
BACKGROUND = (18, 18, 18)


@dataclass
class Frame:
    step: int           # the sampler's step counter
    passes: int         # forward passes of the model so far
    t: float            # seconds of sampling so far, bookkeeping excluded
    ids: list           # token ids of the sample, MASK where not yet revealed


@dataclass
class Run:
    """One model's recorded race: frames[0] is the start (prompt, then MASK for diffusion)."""
    name: str           # 'diffusion' | 'gpt'
    label: str          # how it samples, e.g. 'confidence sampler, 64 steps'
    tok: Tokenizer
    prompt_len: int
    new_tokens: int
    frames: list
    info: dict = field(default_factory=dict)   # out_dir, params, checkpoint step, ...

    @property
    def seconds(self):
        return self.frames[-1].t

    @property
    def final_text(self):
        return self.tok.decode(self.frames[-1].ids, mask_str=MASK_CHAR)

    def frame_at(self, clock):
        """Index of the last frame recorded at or before clock (seconds)."""
        return max(0, bisect.bisect_right([f.t for f in self.frames], clock) - 1)

# -----------------------------------------------------------------------------
# sampling: the race itself


def device_sync(dev):
    """A function that waits for the device, so that elapsed times are real on CUDA and MPS."""
    if dev.type == 'cuda':
        return lambda: torch.cuda.synchronize(dev)
    if dev.type == 'mps':
        return torch.mps.synchronize
    return lambda: None


def record(model, objective, prompt, new_tokens, dev, **kw):
    """Sample once through sample.frames and keep every frame: [Frame], frames[0] the start.
    kw: sampler, steps, temperature, top_k, top_p, seed, schedule (passed to sample.frames)."""
    for _ in itertools.islice(sample.frames(model, objective, prompt, new_tokens, **kw), 2):
        pass  # warm-up; the same seed is used again below, so the race itself is unaffected
    sync = device_sync(dev)
    start_ids = list(prompt) + ([model.cfg.mask_id] * new_tokens if objective == 'diffusion' else [])
    frames = [Frame(0, 0, 0.0, start_ids)]
    stats = {'nfe': 0}  # frames() counts the model's forward passes here
    sync()
    overhead = 0.0
    t0 = time.perf_counter()
    progress = sample.Progress(objective, prompt, new_tokens + list(prompt).count(model.cfg.mask_id),
                               model.cfg.mask_id)
    for step, x, _ in sample.frames(model, objective, prompt, new_tokens, stats=stats, **kw):  # x: (1, N)
        progress.update(x)
        sync()
        t1 = time.perf_counter()
        frames.append(Frame(step, stats['nfe'], t1 - t0 - overhead, x[0].tolist()))
        overhead += time.perf_counter() - t1
    return frames


def default_dir(objective):
    """The out_dir diffusion.py / gpt.py write to when run with their default settings."""
    return diffusion.default_out_dir(Config(settings_of(vars(diffusion))), objective)


def load_runs(c, dev):
    """[(objective, out_dir, model, ckpt)] for the models in the race; one clear line when a
    checkpoint is missing, saying which commands make it."""
    wanted = [('diffusion', c.diffusion_dir or default_dir('diffusion')), ('gpt', c.gpt_dir or default_dir('gpt'))]
    wanted = [w for w in wanted if not (c.diffusion_only and w[0] == 'gpt') and not (c.gpt_only and w[0] == 'diffusion')]
    missing = [(obj, d) for obj, d in wanted if not os.path.exists(ckpt_file(d))
               and not (os.path.isfile(d) and d.endswith('.pt'))]
    if missing:
        where = ' and '.join(f"{d} ({obj})" for obj, d in missing)
        make = '; '.join(['python prepare.py'] + [f"python {obj}.py" + (f" --out_dir={d}" if d != default_dir(obj)
                                                                           else '') for obj, d in missing])
        raise UserError(f"no checkpoint in {where}; make one with: {make} (or point --diffusion_dir/--gpt_dir "
                        f"at a run folder; --diffusion_only/--gpt_only race one model)")
    out = []
    for obj, d in wanted:
        run = sample.load_run(d, dev, trust=sample.trust_list(c.script))
        ckpt = run.ckpt
        if ckpt['objective'] != obj:
            raise UserError(f"--{obj}_dir={d} holds a {ckpt['objective']} checkpoint; pass it as "
                            f"--{ckpt['objective']}_dir")
        out.append((obj, d, run))
    return out


def race(c, dev):
    """Load the checkpoints and run the race: [Run]."""
    loaded = load_runs(c, dev)
    plans = []
    for obj, d, run in loaded:
        model, ckpt, tok = run.model, run.ckpt, run.tokenizer
        prompt = sample.encode_prompt(tok, c.start) if c.start else []
        if obj == 'gpt' and not prompt:  # GPT needs one token to start from (as sample.py does)
            prompt = [tok.eot_id if tok.eot_id is not None else 0]
        plans.append((obj, d, run, tok, prompt))
    infill = any(tok.mask_id in prompt for *_, tok, prompt in plans)  # [MASK] spans in --start
    n = c.length or (0 if infill else min(r.model.cfg.block_size - len(p) for _, _, r, _, p in plans))
    if n < 1 and not infill:
        raise UserError("nothing to generate: the prompt fills the block; pass --length=N or shorten --start")
    runs = []
    for obj, d, run, tok, prompt in plans:
        model, ckpt = run.model, run.ckpt
        label = f"{c.sampler} sampler, {c.steps} steps" if obj == 'diffusion' else 'left to right, KV cache'
        if sample.model_block_len(model):  # block diffusion fills block after block (sample.frames)
            label = f"{c.sampler}, {c.steps} steps per block of {sample.model_block_len(model)}"
        frames = record(model, obj, prompt, n, dev, sampler=c.sampler, steps=c.steps, temperature=c.temperature,
                        top_k=c.top_k, top_p=c.top_p, seed=c.seed, schedule=getattr(run.objective, 'schedule', None),
                        script=run.script)
        info = {'out_dir': d, 'params': model.num_params(), 'checkpoint_step': ckpt['step'],
                'n_layer': model.cfg.n_layer, 'n_embd': model.cfg.n_embd, 'block_size': model.cfg.block_size}
        runs.append(Run(obj, label, tok, len(prompt), n + prompt.count(tok.mask_id), frames, info))
    return runs

# -----------------------------------------------------------------------------
# rendering: rows of (text, style) segments, shared by the terminal, the GIF and the MP4


def token_pieces(tok, ids):
    """The text of each position (None for MASK). Each run of real tokens is decoded whole,
    so ''.join of its pieces == tok.decode(run), also where GPT-2 BPE tokens split a
    character (the first ones get '', the last one the character)."""
    out = [None] * len(ids)
    i = 0
    while i < len(ids):
        if ids[i] == tok.mask_id:
            i += 1
            continue
        j = i
        while j < len(ids) and ids[j] != tok.mask_id:
            j += 1
        run = ids[i:j]
        if tok.kind == 'gpt2':
            text, offsets = tok.enc.decode_with_offsets(run)
            ends = list(offsets[1:]) + [len(text)]
            out[i:j] = [text[a:b] for a, b in zip(offsets, ends)]
        else:
            out[i:j] = [tok.decode([t]) for t in run]
        i = j
    return out


def cell_width(ch):
    """Terminal columns of one character: 2 for East Asian wide ones."""
    return 2 if unicodedata.east_asian_width(ch) in 'WF' else 1


def shown(ch):
    """Characters as displayed: tabs as a space, other control characters as '?'."""
    if ch == '\t':
        return ' '
    return '?' if unicodedata.category(ch) == 'Cc' else ch


def layout(cells, width):
    """cells: [(char, style)] -> rows [[(text, style)]], wrapped at width columns; '\\n' ends a row."""
    rows, row, col = [], [], 0
    for ch, style in cells:
        if ch == '\n':
            rows.append(row)
            row, col = [], 0
            continue
        ch = shown(ch)
        w = cell_width(ch)
        if col + w > width and row:
            rows.append(row)
            row, col = [], 0
        row.append((ch, style))
        col += w
    rows.append(row)
    return [merge(r) for r in rows]


def merge(cells):
    """Join neighbouring cells of the same style into segments."""
    out = []
    for ch, style in cells:
        if out and out[-1][1] == style:
            out[-1] = (out[-1][0] + ch, style)
        else:
            out.append((ch, style))
    return out


def row_text(row):
    return ''.join(t for t, _ in row)


def fmt_seconds(t):
    return f"{1000 * t:.0f} ms" if t < 1 else f"{t:.2f} s"


def text_rows(run, k, prev, width):
    """The wrapped text of run at frame k; positions that differ from frame prev are 'new'."""
    pieces = token_pieces(run.tok, run.frames[k].ids)
    before = token_pieces(run.tok, run.frames[prev].ids) if prev != k else pieces
    start_ids = run.frames[0].ids
    cells = []
    for i, piece in enumerate(pieces):
        if piece is None:
            cells.append((MASK_CHAR, 'mask'))
            continue
        style = ('prompt' if i < run.prompt_len and start_ids[i] != run.tok.mask_id else  # not an infilled span
                 'new' if i >= len(before) or before[i] != piece else 'text')
        cells.extend((ch, style) for ch in piece)
    return layout(cells, width)


def header_row(run, k, clock, width):
    """'diffusion (confidence sampler, 64 steps)   step 12/64  passes 12   210 ms', cut to width."""
    f, last = run.frames[k], run.frames[-1]
    t = run.seconds if k == len(run.frames) - 1 else min(clock, run.seconds)
    w = len(str(last.step))
    stats = f"step {f.step:>{w}}/{last.step}  passes {f.passes:>{len(str(last.passes))}}  {fmt_seconds(t):>7}"
    name = f"{run.name} ({run.label})"
    if len(name) + 2 + len(stats) > width:
        name = run.name
    gap = max(2, width - len(name) - len(stats))
    return [(name, 'head'), (' ' * gap, 'text'), (stats[:max(0, width - len(name) - gap)], 'dim')]


def summary_lines(runs):
    """The result in words: the winner and the ratio, or one model's figures."""
    n = runs[0].new_tokens
    if len(runs) == 1:
        r = runs[0]
        return [f"{r.name}: {n} tokens in {r.frames[-1].step} steps, {r.frames[-1].passes} forward passes, "
                f"{fmt_seconds(r.seconds)} ({n / max(r.seconds, 1e-9):,.0f} tokens/s)"]
    a, b = sorted(runs, key=lambda r: r.seconds)
    ratio = b.seconds / max(a.seconds, 1e-9)
    return [f"winner: {a.name}, {ratio:.1f}x faster than {b.name} ({fmt_seconds(a.seconds)} vs "
            f"{fmt_seconds(b.seconds)} for {n} tokens;",
            f"{a.frames[-1].passes} vs {b.frames[-1].passes} forward passes)"]


def screen(runs, ks, prevs, clock, width, max_rows=None, done=False):
    """The whole picture: per run a header and its text (cut to max_rows), then the result
    when done. Returns rows of (text, style) segments, none wider than width."""
    rows = []
    for run, k, prev in zip(runs, ks, prevs):
        body = text_rows(run, k, prev, width)
        if max_rows is not None and len(body) > max_rows:
            cut = len(body) - max_rows + 1
            body = body[:max_rows - 1] + [[(f"... {cut} more row{'s' * (cut > 1)}", 'dim')]]
        rows += [header_row(run, k, clock, width)] + body + [[]]
    if done:
        for line in summary_lines(runs):
            rows += layout([(ch, 'win') for ch in line], width)
    return rows


def to_ansi(rows, color):
    """Rows of segments -> lines of text; SGR colour codes only when color is True."""
    if not color:
        return [row_text(r) for r in rows]
    return [''.join(f"\x1b[{ANSI[s]}m{t}\x1b[0m" if s in ANSI else t for t, s in r) for r in rows]


def use_color(stream):
    """Colour only on a terminal, and never with NO_COLOR set (https://no-color.org) or TERM=dumb."""
    return (stream.isatty() and not os.environ.get('NO_COLOR') and os.environ.get('TERM') != 'dumb')


def clocks(runs, fps, duration):
    """Replay clock (seconds of real sampling time) at each frame of the animation."""
    end = max(r.seconds for r in runs)
    n = max(1, math.ceil((duration if duration > 0 else end) * fps))
    return [end * i / n for i in range(n + 1)]


def replay(runs, fps, duration, width, max_rows=None):
    """Yield the screen (rows) at each animation frame. A run's new tokens stay highlighted
    until its next frame is shown."""
    ticks = clocks(runs, fps, duration)
    shown_k = [0] * len(runs)
    prevs = [0] * len(runs)
    for i, clock in enumerate(ticks):
        ks = [r.frame_at(clock) for r in runs]
        if i == len(ticks) - 1:
            ks = [len(r.frames) - 1 for r in runs]
        prevs = [s if k != s else p for k, s, p in zip(ks, shown_k, prevs)]
        shown_k = ks
        yield screen(runs, ks, prevs, clock, width, max_rows, done=i == len(ticks) - 1)


def final_screen(runs, width):
    last = [len(r.frames) - 1 for r in runs]
    return screen(runs, last, last, max(r.seconds for r in runs), width, done=True)


def animate(c, runs, out, width, color):
    """Play the race in place on a terminal: redraw the region with cursor movements."""
    term = shutil.get_terminal_size()
    fixed = 2 * len(runs) + 3  # headers, blank rows, the result
    max_rows = max(1, (term.lines - 1 - fixed) // len(runs))
    printed, t0 = 0, time.perf_counter()
    out.write('\x1b[?25l')  # hide the cursor while drawing
    try:
        for i, rows in enumerate(replay(runs, c.fps, c.duration, width, max_rows)):
            lines = to_ansi(rows, color)
            lines += [''] * (printed - len(lines))  # the region never shrinks: no stale rows left
            up = f"\x1b[{printed}F" if printed else ''
            out.write(up + ''.join(f"\x1b[2K{ln}\n" for ln in lines))
            out.flush()
            printed = len(lines)
            wait = t0 + (i + 1) / c.fps - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
    finally:
        out.write('\x1b[?25h')
        out.flush()
    if any(len(text_rows(r, len(r.frames) - 1, len(r.frames) - 1, width)) > max_rows for r in runs):
        out.write("(text cut to fit the terminal; --no_animate prints it whole)\n")

# -----------------------------------------------------------------------------
# exports: frames for the web page, GIF, MP4


def race_json(runs):
    """The race for web/race.js: per run its frames as changes to the text of each position
    (None = MASK), with elapsed time, step and forward passes."""
    out = []
    for r in runs:
        frames, before = [], []
        for f in r.frames:
            pieces = token_pieces(r.tok, f.ids)
            changes = [[i, p] for i, p in enumerate(pieces) if i >= len(before) or before[i] != p]
            frames.append({'step': f.step, 'passes': f.passes, 't': round(f.t, 6), 'length': len(pieces),
                           'set': changes})
            before = pieces
        out.append({'name': r.name, 'label': r.label, 'prompt_len': r.prompt_len, 'new_tokens': r.new_tokens,
                    'seconds': round(r.seconds, 6), 'final_text': r.final_text, 'frames': frames, **r.info})
    return {'format': FORMAT, 'mask': MASK_CHAR, 'summary': ' '.join(summary_lines(runs)), 'runs': out}


def write_export(runs, path):
    """Write PATH.json and PATH.js (the same data assigned to window.RACE_FRAMES, which a page
    opened from file:// can load with a <script> tag where fetch() is not allowed)."""
    data = json.dumps(race_json(runs), ensure_ascii=False, separators=(',', ':'))
    js = path[:-len('.json')] + '.js'
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_text(data + '\n', path)
    atomic_write_text(f"window.RACE_FRAMES = {data};\n", js)
    return js


def page_hint(js):
    """How to open the page for an export at js."""
    web = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'web')
    rel = os.path.relpath(os.path.abspath(js), web).replace(os.sep, '/')
    page = os.path.relpath(os.path.join(web, 'index.html'))
    return page if rel == 'frames.js' else f"{page}?frames={rel}"


def need_pillow(what):
    try:
        from PIL import Image, ImageDraw, ImageFont
    except ImportError:
        raise UserError(f"{what} needs Pillow: pip install pillow") from None
    return Image, ImageDraw, ImageFont


def mono_font(ImageFont, size=15):
    """A monospace TrueType font when one is installed, else Pillow's built-in one."""
    for name in ('DejaVuSansMono.ttf', 'LiberationMono-Regular.ttf', 'Menlo.ttc', 'Consolas.ttf',
                 'Courier New.ttf'):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    return ImageFont.load_default()


def images(c, runs, width):
    """The animation as RGB PIL images of one size (even, for video encoders), plus the
    number of repeats of the last one that hold the result for HOLD_SECONDS."""
    Image, ImageDraw, ImageFont = need_pillow('--gif/--mp4')
    font = mono_font(ImageFont)
    left, top, right, bottom = font.getbbox('M')
    cw, lh = max(1, round(font.getlength('M'))), max(bottom, 1) + 5
    screens = list(replay(runs, c.fps, c.duration, width))
    pad = 12
    w = pad * 2 + width * cw
    h = pad * 2 + max(len(s) for s in screens) * lh
    w, h = w + w % 2, h + h % 2
    out = []
    for rows in screens:
        img = Image.new('RGB', (w, h), BACKGROUND)
        draw = ImageDraw.Draw(img)
        for y, row in enumerate(rows):
            col = 0
            for text, style in row:
                fg, bg = RGB.get(style, RGB['text'])
                for ch in text:  # one cell per character keeps columns aligned in any font
                    x0, y0 = pad + col * cw, pad + y * lh
                    cells = cell_width(ch)
                    if bg:
                        draw.rectangle([x0, y0, x0 + cells * cw - 1, y0 + lh - 1], fill=bg)
                    draw.text((x0, y0 + 2), ch, font=font, fill=fg)
                    col += cells
        out.append(img)
    return out, max(1, round(HOLD_SECONDS * c.fps))


def write_gif(c, runs, path, width):
    imgs, hold = images(c, runs, width)
    frame_ms = max(20, round(1000 / c.fps))  # most viewers treat delays under 20 ms as 100 ms
    durations = [frame_ms] * (len(imgs) - 1) + [frame_ms * hold]
    imgs = [im.quantize(colors=64) for im in imgs]
    imgs[0].save(path, save_all=True, append_images=imgs[1:], duration=durations, loop=0, optimize=True)


def write_mp4(c, runs, path, width):
    ffmpeg = shutil.which('ffmpeg')
    imgs, hold = images(c, runs, width)
    w, h = imgs[0].size
    cmd = [ffmpeg, '-loglevel', 'error', '-y', '-f', 'rawvideo', '-pix_fmt', 'rgb24', '-s', f'{w}x{h}',
           '-r', str(c.fps), '-i', '-', '-pix_fmt', 'yuv420p', '-movflags', '+faststart', path]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        for im in imgs + [imgs[-1]] * (hold - 1):
            proc.stdin.write(im.tobytes())
        proc.stdin.close()
    except BrokenPipeError:
        pass  # ffmpeg stopped early; its message follows
    err = proc.stderr.read().decode(errors='replace').strip()
    if proc.wait() != 0:
        raise UserError(f"ffmpeg failed writing {path}: {(err.splitlines() or ['no message'])[-1]}")

# -----------------------------------------------------------------------------


RULES = {'sampler': one_of(sample.SAMPLERS), 'steps': at_least(1), 'length': at_least(0), 'fps': at_least(1),
         'duration': at_least(0.0), 'width': (lambda v: v == 0 or v >= 20, "0 (the terminal's) or at least 20"),
         **{k: v for k, v in sample.RULES.items() if k in ('temperature', 'top_k', 'top_p')}}


def check_settings(c):
    """One clear line for each impossible combination, before any model is loaded."""
    if c.diffusion_only and c.gpt_only:
        raise UserError("--diffusion_only and --gpt_only exclude each other", EXIT_USAGE)
    if c.export and not c.export.endswith('.json'):
        raise UserError(f"--export={c.export}: give a path ending in .json (a .js is written beside it)",
                        EXIT_USAGE)
    if c.gif or c.mp4:
        need_pillow('--gif' if c.gif else '--mp4')
    if c.mp4 and not shutil.which('ffmpeg'):
        raise UserError("--mp4 needs ffmpeg on the PATH (apt-get install ffmpeg, or brew install ffmpeg); "
                        "--gif works without it")


def main():
    c = configure(globals(), rules=RULES, verbose=False)
    check_settings(c)
    dev = resolve_device(c.device)
    out = sys.stdout
    tty = out.isatty()
    cols = c.width or (min(80, shutil.get_terminal_size().columns) if tty else 80)
    if tty:
        out.write('sampling...')
        out.flush()
    runs = race(c, dev)
    if tty:
        out.write('\r' + ' ' * 11 + '\r')
    color = use_color(out)
    if tty and not c.no_animate and os.environ.get('TERM') != 'dumb':
        animate(c, runs, out, cols, color)
    else:
        out.write(''.join(ln + '\n' for ln in to_ansi(final_screen(runs, cols), color)))
    if c.export:
        js = write_export(runs, c.export)
        print(f"wrote {c.export} and {js}; open {page_hint(js)}")
    if c.gif:
        write_gif(c, runs, c.gif, cols)
        print(f"wrote {c.gif}")
    if c.mp4:
        write_mp4(c, runs, c.mp4, cols)
        print(f"wrote {c.mp4}")


if __name__ == '__main__':
    try:
        run_cli(main)
    except KeyboardInterrupt:
        sys.exit(130)
