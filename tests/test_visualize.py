"""visualize.py: the race from real checkpoints through the real samplers, rendered for a
terminal (final frame == the samplers' text, no escape codes without colour), the animation,
the CLI in a pipe, the export for the web page, GIF and MP4."""
import contextlib
import io
import json
import os
import re
import shutil

import pytest
import torch

import sample
import visualize
from conftest import REPO, run_script
from sample import load_checkpoint
from diffusion import Schedule
from runtime import Config, Tokenizer, UserError, settings_of

LENGTH, STEPS, WIDTH = 24, 8, 80
ESC = '\x1b'


@contextlib.contextmanager
def settings(**kw):
    """visualize's settings for one race: its defaults with these changes."""
    base = dict(diffusion_dir='', gpt_dir='', diffusion_only=False, gpt_only=False, length=LENGTH, steps=STEPS,
                sampler='confidence', start='', seed=1337, temperature=1.0, top_k=0, top_p=1.0, fps=20, duration=0.2)
    yield Config({**settings_of(vars(visualize)), **base, **kw})


@pytest.fixture(scope='module')
def runs(tiny_runs):
    with settings(diffusion_dir=tiny_runs['diffusion'], gpt_dir=tiny_runs['gpt']) as c:
        return visualize.race(c, torch.device('cpu'))


def sampler_text(out_dir, objective, sampler='confidence'):
    """The same sample drawn directly through sample.generate_tokens, decoded."""
    model, ckpt = load_checkpoint(out_dir)
    tok = Tokenizer(ckpt['meta'])
    prompt = [] if objective == 'diffusion' else [tok.eot_id if tok.eot_id is not None else 0]
    x, info = sample.generate_tokens(model, objective, prompt, LENGTH, sampler=sampler, steps=STEPS, seed=1337,
                                     schedule=Schedule(ckpt['config']['schedule']) if objective == 'diffusion' else None)
    return tok.decode(x[0].tolist()), info


def wrap(text, width):
    """Hard wrap at width columns, each '\\n' ending a row (what a terminal shows)."""
    return [line[i:i + width] for line in text.split('\n') for i in range(0, max(len(line), 1), width)]


def test_final_frame_is_the_samplers_text(runs, tiny_runs):
    assert [r.name for r in runs] == ['diffusion', 'gpt']
    lines = visualize.to_ansi(visualize.final_screen(runs, WIDTH), color=False)
    assert all(len(ln) <= WIDTH for ln in lines) and not any(ESC in ln for ln in lines)
    for run in runs:
        text, info = sampler_text(tiny_runs[run.name], run.name)
        assert run.final_text == text
        head = next(i for i, ln in enumerate(lines) if ln.startswith(run.name + ' ('))
        body = wrap(text, WIDTH)
        assert lines[head + 1:head + 1 + len(body)] == body, (lines, body)
        assert lines[head + 1 + len(body)] == ''
        # counters: one forward pass per step for both samplers, as the hook on the model counted
        last = run.frames[-1]
        assert last.step == info['nfe'] == last.passes == (STEPS if run.name == 'diffusion' else LENGTH)
        assert f"step {last.step}/{last.step}" in lines[head] and f"passes {last.passes}" in lines[head]
        times = [f.t for f in run.frames]
        assert times == sorted(times) and times[0] == 0 < times[-1]
    winner = min(runs, key=lambda r: r.seconds)
    assert any(ln.startswith(f"winner: {winner.name}, ") for ln in lines)


def test_diffusion_frames_reveal_masks_and_gpt_grows(runs):
    d, g = runs
    first = visualize.token_pieces(d.tok, d.frames[0].ids)
    assert first == [None] * LENGTH
    masked = [sum(p is None for p in visualize.token_pieces(d.tok, f.ids)) for f in d.frames]
    assert masked[0] == LENGTH and masked[-1] == 0 and masked == sorted(masked, reverse=True)
    assert len(set(masked)) > 2  # revealed over several steps, not all at once
    assert [len(f.ids) for f in g.frames] == list(range(g.prompt_len, g.prompt_len + LENGTH + 1))


def test_no_escape_codes_with_no_color(runs, monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True
    k = [len(r.frames) // 2 for r in runs]
    mid = visualize.screen(runs, k, [x - 1 for x in k], 0.0, WIDTH)
    monkeypatch.delenv('NO_COLOR', raising=False)
    monkeypatch.setenv('TERM', 'xterm-256color')
    assert visualize.use_color(Tty()) and not visualize.use_color(io.StringIO())
    coloured = '\n'.join(visualize.to_ansi(mid, visualize.use_color(Tty())))
    assert f"{ESC}[{visualize.ANSI['new']}m" in coloured and f"{ESC}[{visualize.ANSI['mask']}m" in coloured
    monkeypatch.setenv('NO_COLOR', '1')
    assert not visualize.use_color(Tty())
    plain = visualize.to_ansi(mid, visualize.use_color(Tty()))
    assert ESC not in '\n'.join(plain) and visualize.MASK_CHAR * 2 in '\n'.join(plain)
    assert [re.sub(r'\x1b\[[0-9;]*m', '', ln) for ln in coloured.split('\n')] == plain


def test_animation_redraws_in_place_and_ends_on_the_final_frame(runs, monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True
    out = Tty()
    with settings(fps=50, duration=0.1) as c:
        visualize.animate(c, runs, out, WIDTH, color=False)
    s = out.getvalue()
    redraws = re.split(r'\x1b\[\d+F', s)
    assert len(redraws) == len(visualize.clocks(runs, 50, 0.1))  # one redraw per tick
    last = [ln.removeprefix(f'{ESC}[2K') for ln in redraws[-1].replace(f'{ESC}[?25h', '').split('\n')]
    final = visualize.to_ansi(visualize.final_screen(runs, WIDTH), color=False)
    assert [ln for ln in last if ln] == [ln for ln in final if ln]
    assert s.startswith(f'{ESC}[?25l') and s.endswith(f'{ESC}[?25h')


def test_cli_in_a_pipe_with_export(tiny_runs, tmp_path):
    export = tmp_path / 'web' / 'frames.json'
    r = run_script('visualize.py', f"--diffusion_dir={tiny_runs['diffusion']}", f"--gpt_dir={tiny_runs['gpt']}",
                   f'--length={LENGTH}', f'--steps={STEPS}', '--sampler=confidence', f'--export={export}')
    race_lines = r.stdout.split('\nwrote ')[0].splitlines()  # the file paths after it may be long
    assert ESC not in r.stdout and all(len(ln) <= WIDTH for ln in race_lines)
    assert 'winner: ' in r.stdout and 'x faster than ' in r.stdout and f'wrote {export}' in r.stdout
    data = json.loads(export.read_text())
    js = (tmp_path / 'web' / 'frames.js').read_text()
    assert js.startswith('window.RACE_FRAMES = ') and json.loads(js[len('window.RACE_FRAMES = '):-2]) == data
    assert data['format'] == visualize.FORMAT and [x['name'] for x in data['runs']] == ['diffusion', 'gpt']
    for run in data['runs']:
        text, _ = sampler_text(tiny_runs[run['name']], run['name'])
        assert run['final_text'] == text and wrap(text, WIDTH)[0] in r.stdout.splitlines()
        pieces = []  # replay the changes as race.js does
        for f in run['frames']:
            del pieces[f['length']:]
            pieces += [None] * (f['length'] - len(pieces))
            for i, s in f['set']:
                pieces[i] = s
        assert ''.join(pieces) == text and run['params'] > 0
        assert len(run['frames']) == 1 + (STEPS if run['name'] == 'diffusion' else LENGTH)


def test_one_model_other_samplers_and_bad_settings(tiny_runs):
    # ancestral_cache skips the forward pass when no token changed: passes are counted, not assumed
    with settings(diffusion_dir=tiny_runs['diffusion'], diffusion_only=True, sampler='ancestral_cache') as c:
        (run,) = visualize.race(c, torch.device('cpu'))
    text, info = sampler_text(tiny_runs['diffusion'], 'diffusion', 'ancestral_cache')
    assert run.name == 'diffusion' and run.final_text == text and run.frames[-1].passes == info['nfe'] <= STEPS + 1
    assert visualize.summary_lines([run])[0].startswith(f'diffusion: {LENGTH} tokens in ')
    # infilling: the prompt stays, the [MASK:6] span is revealed and is not styled as prompt
    with settings(diffusion_dir=tiny_runs['diffusion'], diffusion_only=True, length=0, start='ROMEO:[MASK:6] the') as c:
        (run,) = visualize.race(c, torch.device('cpu'))
    assert run.new_tokens == 6 and run.final_text.startswith('ROMEO:') and run.final_text.endswith(' the')
    styles = [st for row in visualize.text_rows(run, len(run.frames) - 1, 0, WIDTH) for t, st in row for _ in t]
    pieces = visualize.token_pieces(run.tok, run.frames[-1].ids)
    assert styles == [('new' if 6 <= i < 12 else 'prompt') for i, p in enumerate(pieces) for ch in p if ch != '\n']
    with settings(gpt_dir=tiny_runs['diffusion'], gpt_only=True) as c, pytest.raises(UserError, match='--diffusion_dir'):
        visualize.race(c, torch.device('cpu'))
    with settings(diffusion_only=True, gpt_only=True) as c, pytest.raises(UserError, match='exclude'):
        visualize.check_settings(c)


def test_no_checkpoint_says_which_commands_make_one(tmp_path):
    with settings(diffusion_dir=str(tmp_path / 'd'), gpt_dir=str(tmp_path / 'g')) as c, pytest.raises(UserError) as e:
        visualize.race(c, torch.device('cpu'))
    msg = str(e.value)
    assert '\n' not in msg and 'no checkpoint' in msg
    assert all(cmd in msg for cmd in ('python prepare.py', 'python diffusion.py', 'python gpt.py'))


def test_gif(runs, tmp_path):
    Image = pytest.importorskip('PIL.Image', reason='Pillow is not installed (pip install pillow)')
    path = str(tmp_path / 'race.gif')
    with settings(fps=10, duration=0.5) as c:
        visualize.write_gif(c, runs, path, WIDTH)
    with Image.open(path) as im:
        assert im.is_animated and im.n_frames > 2 and im.size[0] > 400
    os.makedirs(os.path.join(REPO, 'artifacts'), exist_ok=True)
    shutil.copy(path, os.path.join(REPO, 'artifacts', 'race.gif'))


def test_mp4(runs, tmp_path):
    pytest.importorskip('PIL', reason='Pillow is not installed (pip install pillow)')
    if not shutil.which('ffmpeg'):
        pytest.skip('ffmpeg is not on the PATH')
    path = tmp_path / 'race.mp4'
    with settings(fps=10, duration=0.3) as c:
        visualize.write_mp4(c, runs, str(path), WIDTH)
    head = path.read_bytes()[:12]
    assert head[4:8] == b'ftyp' and path.stat().st_size > 1000
