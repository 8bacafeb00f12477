"""A newcomer's first hour: --help everywhere, warnings for settings that make no sense together,
progress and ETA in the log line, optional Weights & Biases, one error line under torchrun."""
import importlib.util
import os
import subprocess
import sys

import pytest

import diffusion as D
from conftest import REPO, TINY, run_script

SCRIPTS = ['diffusion.py', 'gpt.py', 'sample.py', 'evaluate.py', 'visualize.py', 'prepare.py', 'study.py']


@pytest.mark.parametrize('script', SCRIPTS)
@pytest.mark.parametrize('flag', ['--help', '-h'])
def test_help_lists_every_setting_with_its_comment(script, flag):
    r = run_script(script, flag)
    assert r.returncode == 0 and r.stderr == ''
    assert r.stdout.startswith(f'usage: python {script}')
    # every setting named in the script's globals block appears, with the comment written after it
    src = open(os.path.join(REPO, script)).read().splitlines()
    for line in src:
        name, eq, rest = line.partition('=')
        if eq and not line[0].isspace() and name.strip().islower() and name.strip().isidentifier() and '#' in rest:
            comment = rest.split('#', 1)[1].strip()
            assert f'--{name.strip()}=' in r.stdout, name
            assert comment in r.stdout, (name, comment)


def test_help_shows_the_rules_from_the_registries():
    out = run_script('diffusion.py', '--help').stdout
    assert f"--schedule='linear'  [one of {', '.join(D.SCHEDULES)}]" in out
    assert "--t_min=0.001  [in [0, 1)]" in out
    gpt = run_script('gpt.py', '--help').stdout
    assert '--schedule' not in gpt and '--learning_rate' in gpt


def test_warnings_and_progress(char_data, tmp_path):
    r = run_script('diffusion.py', *TINY, f'--data_dir={char_data}', f'--out_dir={tmp_path / "r"}', '--max_iters=4',
                   '--warmup_iters=10', '--eval_interval=50', '--log_interval=2')
    assert 'warning: warmup_iters=10 is longer than the run' in r.stdout
    assert 'warning: eval_interval=50 > max_iters' in r.stdout
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith('step 2/4 |')]
    assert len(lines) == 1 and '| eta ' in lines[0], r.stdout


@pytest.mark.skipif(importlib.util.find_spec('wandb') is not None, reason='wandb is installed (tested offline below)')
def test_wandb_missing_is_one_line(char_data, tmp_path):
    r = run_script('diffusion.py', *TINY, f'--data_dir={char_data}', f'--out_dir={tmp_path / "r"}', '--max_iters=2',
                   '--wandb_log=true', check=False)
    assert r.returncode == 1 and r.stderr.strip() == 'error: --wandb_log=true needs the wandb package: pip install wandb'


@pytest.mark.skipif(importlib.util.find_spec('wandb') is None, reason='wandb is not installed (optional)')
def test_wandb_offline(char_data, tmp_path, monkeypatch):
    monkeypatch.setenv('WANDB_MODE', 'offline')
    monkeypatch.setenv('WANDB_DIR', str(tmp_path))
    run_script('diffusion.py', *TINY, f'--data_dir={char_data}', f'--out_dir={tmp_path / "r"}', '--max_iters=2',
               '--wandb_log=true', '--wandb_run_name=test')
    assert any(name.startswith('offline-run') for name in os.listdir(tmp_path / 'wandb'))


def test_torchrun_prints_a_usage_error_once(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                        os.path.join(REPO, 'diffusion.py'), '--t_min=2', '--device=cpu'],
                       capture_output=True, text=True, env=env, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert out.count('error: --t_min=2.0: must be in [0, 1)') == 1, out
