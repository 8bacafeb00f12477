"""
report.py: the reporting of evaluations. It reads what evaluate.py measured (eval.json, each run's
log.jsonl) and writes it up: --compare's table and plots, study.py's cell table and plots; and
the statistics of results both rest on (Student's t quantile, confidence intervals over samples
and over seeds), and strict JSON.

    python evaluate.py --compare DIR1 DIR2 ...   # write_compare: compare.md/.json, loss_curves.png,
                                                 #   nelbo_by_schedule.png
    python study.py                              # summarise_cells: study.md/.json, cells.png, cell_curves.png

study.py's race and stall tables use md_table, seed_ci, write_json and pyplot from here too.
It measures nothing and runs no model: the estimators, bounds and sample-quality measures are
evaluate.py's, and evaluate.py imports this file, never the other way round. So a table can be
redrawn from cached eval.json files alone, and study.py tabulates its runs without importing
evaluate.py (it runs it as a script). Plots need matplotlib, and are skipped with a note without it.
"""
import json
import math
import os
import statistics

import numpy as np
import torch

from diffusion import Schedule
from runtime import atomic_write_text, read_log

Z975 = 1.959963984540054        # the standard normal's 97.5% quantile: t975 as df -> infinity

# -----------------------------------------------------------------------------
# statistics of results: evaluate.py's confidence intervals and the study's, over seeds


def incomplete_beta(a, b, x):
    """The regularised incomplete beta function I_x(a, b), by its continued fraction (modified
    Lentz; Press et al., Numerical Recipes, sec. 6.4), to double precision."""
    if x <= 0 or x >= 1:
        return float(x >= 1)
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast on this side only
        return 1 - incomplete_beta(b, a, 1 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    tiny, f, c, d = 1e-300, 1.0, 1.0, 0.0
    for i in range(400):
        m = i // 2
        num = 1.0 if i == 0 else (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)) if i % 2 == 0 else
                                  -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)))
        d = 1 + num * d
        d = 1 / (d if abs(d) > tiny else tiny)
        c = 1 + num / c
        c = c if abs(c) > tiny else tiny
        f *= c * d
        if abs(1 - c * d) < 1e-15:
            break
    return front * (f - 1)


def t975(df):
    """97.5% quantile of Student's t with df (any real > 0) degrees of freedom, exact: the t
    with P(T > t) = 0.025 = I_{df / (df + t^2)}(df / 2, 1 / 2) / 2, by bisection (12.706 at df 1,
    4.303 at df 2, 1.960 as df -> infinity)."""
    if not math.isfinite(df):
        return Z975
    df = max(df, 1e-3)
    lo, hi = Z975, 4.0
    while incomplete_beta(df / 2, 0.5, df / (df + hi * hi)) > 0.05:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if incomplete_beta(df / 2, 0.5, df / (df + mid * mid)) > 0.05 else (lo, mid)
        if hi - lo < 1e-12 * hi:
            break
    return (lo + hi) / 2


def sample_ppl_ci(nats):
    """Perplexity exp(mean) of per-sample mean NLLs (equal lengths) with its 95% CI, Student's t
    over the samples: {'ppl', 'lo', 'hi', 'rel_ci95' (half-width / ppl, on the log scale), 'n'}."""
    n, m = len(nats), float(np.mean(nats))
    h = t975(n - 1) * float(np.std(nats, ddof=1)) / math.sqrt(n) if n > 1 else math.inf
    return {'ppl': math.exp(m), 'lo': math.exp(m - h), 'hi': math.exp(m + h), 'rel_ci95': math.expm1(h), 'n': n}


def mean_sd(values):
    v = [x for x in values if x is not None]
    if not v:
        return None, None
    return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)


def seed_ci(values):
    """(mean, half-width of its 95% CI over seeds by Student's t with n - 1 df); CI None for one value."""
    mean, sd = mean_sd(values)
    n = sum(x is not None for x in values)
    return mean, (t975(n - 1) * sd / math.sqrt(n) if n > 1 else None)

# -----------------------------------------------------------------------------
# files: what evaluate.py writes, and the training log it reads back


def training_log(run_dir):
    """Training-time records of log.jsonl: train loss and validation curves, last values."""
    out = {'train': [], 'val': []}
    for rec in read_log(os.path.join(run_dir, 'log.jsonl'), warn=False):
        if 'val_loss' in rec:
            out['val'].append({k: rec[k] for k in ('step', 'epoch', 'val_loss', 'val_nelbo', 'val_loss_se', 'val_nelbo_se')
                               if k in rec})
        elif 'loss' in rec and 'event' not in rec:
            out['train'].append({'step': rec['step'], 'loss': rec['loss']})
    if out['val']:
        last = out['val'][-1]
        out['last_val_loss'] = last.get('val_loss')
        out['last_val_nelbo'] = last.get('val_nelbo')
        out['last_val_nelbo_se'] = last.get('val_nelbo_se')
        out['last_val_step'] = last.get('step')
    return out


def write_json(obj, path):
    """Strict JSON (readable by any parser): infinite or NaN figures become null."""
    def clean(o):
        if isinstance(o, float) and not math.isfinite(o):
            return None
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        return o
    atomic_write_text(json.dumps(clean(obj), indent=1, allow_nan=False) + '\n', path)

# -----------------------------------------------------------------------------
# comparison across runs: evaluate.py --compare's table and plots


def row_of(res):
    lik = res['likelihood']
    e = lik[lik['headline']]
    s = res.get('samples') or {}
    m, sd = s.get('mean', {}), s.get('sd', {})
    wt = res.get('wikitext2')
    tr = res.get('training', {})
    return {'run': os.path.basename(res['run'].rstrip('/')), 'path': res['run'], 'objective': res['objective'],
            'schedule': res.get('schedule') or '-', 'masking': res.get('masking') or '-',
            'block_len': res.get('block_len') or 0, 'step': res['ckpt_step'],
            'params': res['params'], 'estimator': lik['headline'], 'nats': e['nats'], 'ci95': e['ci95'],
            'bits': e['bits'], 'bits_unit': e['bits_unit'], 'ppl': e['ppl'], 'ppl_lo': e['ppl_lo'],
            'ppl_hi': e['ppl_hi'],
            'discrete_ppl': lik['discrete']['ppl'] if 'discrete' in lik else None,
            'wikitext2_ppl': wt[wt['headline']]['ppl'] if wt else None,
            'gen_ppl': m.get('samples_gen_ppl'), 'gen_ppl_sd': sd.get('samples_gen_ppl'),
            'gen_ppl_rel_ci95': (s.get('gen_ppl_ci') or {}).get('rel_ci95'),
            'gen_nats': [x for r in s.get('per_seed', []) for x in r['samples'].get('nats_per_sample', [])],
            'final_fill': (res.get('settings') or {}).get('final_fill'),
            'entropy': m.get('samples_entropy'), 'data_entropy': m.get('data_entropy'),
            'mauve': m.get('mauve'), 'mauve_sd': sd.get('mauve'), 'reference': s.get('reference'),
            'val_loss': tr.get('last_val_loss'), 'val_nelbo': tr.get('last_val_nelbo'),
            'val_nelbo_se': tr.get('last_val_nelbo_se')}


def fmt(v, spec='.3f', sd=None):
    if v is None:
        return '-'
    return f"{v:{spec}}" + (f" ± {sd:{spec}}" if sd is not None else '')


def md_table(head, rows, notes=()):
    """A markdown table (head: column names; rows: lists of cell texts) and its notes as a list."""
    out = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)] + ['| ' + ' | '.join(r) + ' |' for r in rows]
    return '\n'.join(out) + '\n\n' + '\n'.join(f"- {n}" for n in notes) + '\n'


def pyplot(log=print):
    """matplotlib.pyplot without a display, or None (and a note) when matplotlib is absent."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        log("no plots: matplotlib is not installed (pip install matplotlib)")
        return None
    return plt


def markdown_table(rows):
    head = ['run', 'objective', 'schedule', 'masking', 'step', 'NELBO/NLL nats/token (95% CI)', 'PPL [95% CI]',
            'discrete PPL', 'WikiText-2 PPL', 'gen PPL', 'entropy', 'MAUVE', 'val_loss (log)', 'val_nelbo (log)']
    out = []
    for r in rows:
        kind = f"block diffusion L={r['block_len']}" if r.get('block_len') else r['objective']
        cells = [r['run'], kind, r['schedule'], r['masking'], str(r['step']),
                 f"{r['nats']:.4f} ± {r['ci95']:.4f}" + (' (exact)' if r['estimator'] == 'exact' else ''),
                 f"{r['ppl']:.3f} [{r['ppl_lo']:.3f}, {r['ppl_hi']:.3f}]", fmt(r['discrete_ppl']),
                 fmt(r['wikitext2_ppl'], '.2f'), fmt(r['gen_ppl'], '.2f', r['gen_ppl_sd']), fmt(r['entropy']),
                 fmt(r['mauve'], '.3f', r['mauve_sd']), fmt(r['val_loss'], '.4f'), fmt(r['val_nelbo'], '.4f')]
        out.append(cells)
    refs = sorted({r['reference'] for r in rows if r['reference']})
    notes = ["NELBO: uniform-masking bound (continuous t) for diffusion runs (block diffusion: its own bound, uniform "
             "masking within each block given the text before it), exact NLL for GPT runs, on the same "
             "tokens of each run's validation split; the CI is Monte Carlo error. val_loss/val_nelbo: the "
             "training log's own last estimates (val_loss follows each run's schedule and masking: not comparable)."]
    if refs:
        notes.append("gen PPL and MAUVE features under: " + '; '.join(refs) +
                     (" -- WARNING: runs were scored under different references" if len(refs) > 1 else ''))
    return md_table(head, out, notes)


def plots(rows, report, log=print):
    """loss_curves.png (training log) and nelbo_by_schedule.png; skipped without matplotlib."""
    plt = pyplot(log)
    if plt is None:
        return []
    made = []
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in rows:
        tr = training_log(r['path'])
        if tr['train']:
            ax1.plot([p['step'] for p in tr['train']], [p['loss'] for p in tr['train']], label=r['run'], lw=1)
        if tr['val']:
            line, = ax2.plot([p['step'] for p in tr['val']], [p['val_loss'] for p in tr['val']], marker='.',
                             label=f"{r['run']} val_loss")
            nel = [(p['step'], p['val_nelbo']) for p in tr['val'] if 'val_nelbo' in p]
            if nel:
                ax2.plot(*zip(*nel), ls='--', color=line.get_color(), label=f"{r['run']} val_nelbo (uniform)")
    ax1.set(title='training loss (each run its own objective)', xlabel='step', ylabel='nats/token')
    ax2.set(title='validation during training', xlabel='step', ylabel='nats/token')
    for ax in (ax1, ax2):
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(report, 'loss_curves.png')
    fig.savefig(path, dpi=110)
    plt.close(fig)
    made.append(path)
    order = sorted(rows, key=lambda r: (r['objective'] != 'gpt', r['schedule'], r['masking'], r['run']))
    fig, ax = plt.subplots(figsize=(max(6.5, 1.1 * len(order) + 2), 4.5))
    colors = {'uniform': 'tab:blue', 'entropy': 'tab:orange', '-': 'tab:gray'}
    for i, r in enumerate(order):  # points, not bars: the axis is zoomed to the differences
        ax.errorbar(i, r['nats'], yerr=r['ci95'], fmt='o', color=colors.get(r['masking'], 'tab:green'), capsize=5,
                    label=(r['masking'] if r['objective'] == 'diffusion' else 'GPT (exact NLL)'))
    handles, labels = ax.get_legend_handles_labels()
    keep = {lab: h for h, lab in zip(handles, labels)}
    ax.legend(keep.values(), keep.keys(), fontsize=8, title='masking', title_fontsize=8)
    ax.set_xticks(range(len(order)), [f"{r['schedule'] if r['objective'] != 'gpt' else 'GPT'}\n{r['masking']}\n"
                                      f"{r['run']}" for r in order], fontsize=7)
    lo = min(r['nats'] - r['ci95'] for r in order)
    hi = max(r['nats'] + r['ci95'] for r in order)
    ax.set_ylim(max(0.0, lo - 0.15 * (hi - lo + 1e-3)), hi + 0.15 * (hi - lo + 1e-3))
    ax.set(title='uniform-masking NELBO (GPT: exact NLL), 95% CI', ylabel='nats/token')
    ax.set_xlim(-0.6, len(order) - 0.4)
    fig.tight_layout()
    path = os.path.join(report, 'nelbo_by_schedule.png')
    fig.savefig(path, dpi=110)
    plt.close(fig)
    made.append(path)
    return made


def write_compare(results, report, with_plots, log=print):
    """--compare's files in the folder `report`: compare.md (the table, also logged), the plots
    when with_plots, and compare.json (the rows, every run's results, the plots' paths). Returns
    the rows. results: the runs' eval.json contents, in order."""
    rows = [row_of(r) for r in results]
    os.makedirs(report, exist_ok=True)
    table = markdown_table(rows)
    atomic_write_text(table, os.path.join(report, 'compare.md'))
    made = plots(rows, report, log) if with_plots else []
    write_json({'rows': rows, 'results': results, 'plots': made}, os.path.join(report, 'compare.json'))
    log(table)
    log(f"wrote {os.path.join(report, 'compare.md')}, compare.json" + (', ' + ', '.join(map(os.path.basename, made))
                                                                      if made else ''))
    return rows

# -----------------------------------------------------------------------------
# study.py's cells: runs grouped by (objective, block length, schedule, masking), over seeds


def coverage(name):
    """The range of mask rates [1 - alpha(0), 1 - alpha(1)] a schedule trains on; the NELBO as
    trained is a bound on the likelihood only where this is [0, 1] (see README, The math)."""
    s = Schedule(name)
    a = s.alpha(torch.tensor([0.0, 1.0], dtype=torch.float64)).tolist()
    return 1 - a[0], 1 - a[1]


CELL_KEYS = ('nats', 'ppl', 'val_loss', 'val_nelbo', 'gen_ppl', 'entropy', 'data_entropy', 'mauve')


def summarise_cells(dirs, out):
    """study.py's table (study.md, study.json) and its plots (cells.png, cell_curves.png): the runs'
    eval.json grouped by (objective, block length, schedule, masking), mean and 95% CI over seeds."""
    rows = []
    for d in dirs:
        with open(os.path.join(d, 'eval.json')) as f:
            rows.append(row_of(json.load(f)))
    cells = {}
    for r in rows:
        cells.setdefault((r['objective'], r.get('block_len') or 0, r['schedule'], r['masking']), []).append(r)
    table = []
    order = sorted(cells.items(), key=lambda kv: (kv[0][0] != 'gpt', kv[0][1] == 0, kv[0][1], kv[0][2], kv[0][3]))
    for (obj, block_len, sched, mask), rs in order:   # GPT, block diffusion by block length, then MDLM
        cell = {'objective': obj, 'block_len': block_len, 'schedule': sched, 'masking': mask, 'seeds': len(rs),
                'runs': [r['run'] for r in rs], 'paths': [r['path'] for r in rs]}
        if obj == 'diffusion':
            lo, hi = coverage(sched)
            cell['mask_rates_trained'] = [lo, hi]
            cell['bound_as_trained'] = mask == 'uniform' and lo < 1e-9 and hi > 0.999 and not block_len
        for k in CELL_KEYS:
            cell[k], cell[k + '_ci95'] = seed_ci([r[k] for r in rs])
            cell[k + '_sd'] = mean_sd([r[k] for r in rs])[1]
        cell['nelbo_ci95_mean'] = statistics.fmean(r['ci95'] for r in rs)
        nats = [x for r in rs for x in r['gen_nats']]
        cell['gen_ppl_pooled'] = sample_ppl_ci(nats) if nats else None   # all the cell's samples: sampling error only
        cell['final_fill'] = sorted({str(r['final_fill']) for r in rs})
        table.append(cell)
    write_json({'cells': table, 'unit': rows[0]['bits_unit'] if rows else None}, os.path.join(out, 'study.json'))

    def f(c, k, spec='.3f'):
        return '-' if c[k] is None else f"{c[k]:{spec}}" + (f" ± {c[k + '_ci95']:{spec}}" if c[k + '_ci95'] is not None else '')
    head = ['model', 'schedule', 'masking', 'mask rates trained', 'bound as trained?', 'seeds',
            'uniform NELBO / NLL (nats/char)', 'PPL', 'val_loss in training log', 'val_nelbo in training log',
            'gen PPL', 'gen PPL, all samples [95% CI]', 'sample entropy']
    cells_md = []
    for c in table:
        gpt = c['objective'] == 'gpt'
        pooled = c['gen_ppl_pooled']
        cells_md.append([
            'GPT' if gpt else f"block diffusion L={c['block_len']}" if c['block_len'] else 'diffusion', c['schedule'],
            c['masking'],
            '-' if gpt else f"[{c['mask_rates_trained'][0]:.4f}, {c['mask_rates_trained'][1]:.4f}]",
            'exact NLL' if gpt else ('yes' if c['bound_as_trained'] else 'no'), str(c['seeds']),
            f(c, 'nats', '.4f'), f(c, 'ppl'), f(c, 'val_loss', '.4f'), '-' if gpt else f(c, 'val_nelbo', '.4f'),
            f(c, 'gen_ppl', '.2f'),
            '-' if not pooled else f"{pooled['ppl']:.2f} [{pooled['lo']:.2f}, {pooled['hi']:.2f}] "
                                   f"(±{100 * pooled['rel_ci95']:.1f}%)",
            f(c, 'entropy')])
    data_entropy = mean_sd([c['data_entropy'] for c in table])[0]
    fills = sorted({x for c in table if c['objective'] != 'gpt' for x in c['final_fill']})
    rel_se = sorted(r['val_nelbo_se'] / r['val_nelbo'] for r in rows if r.get('val_nelbo_se') and r['val_nelbo'])
    n_samples = [pooled['n'] for c in table if (pooled := c['gen_ppl_pooled'])]
    notes = [
        'mean ± half-width of the 95% CI over seeds (Student\'s t with seeds - 1 degrees of freedom: 4.30 x sd / '
        'sqrt(3) for 3 seeds). "uniform NELBO": evaluate.py\'s uniform-masking bound on the '
        'validation split for every diffusion run (the fair yardstick; its Monte Carlo 95% CI averages '
        f"{statistics.fmean(c['nelbo_ci95_mean'] for c in table):.4f} nats); for block diffusion the same bound "
        'within each block, the text before it as context; exact NLL for GPT.',
        '"val_loss in training log": each run\'s own objective (its schedule, masking and weighting) at the '
        'last evaluation; "val_nelbo in training log": the uniform bound estimated by the training loop '
        '(stratified times, control variate)' + (
            f"; its standard error per run: median {100 * rel_se[len(rel_se) // 2]:.2f}% of the value, "
            f"{100 * rel_se[0]:.2f}-{100 * rel_se[-1]:.2f}%, and a cell's mean over {table[-1]['seeds']} seeds "
            f"about 1/sqrt({table[-1]['seeds']}) of that" if rel_se else '') + '.',
        'gen PPL: samples of block_size tokens scored by the seed-0 GPT baseline; read it next to the entropy '
        + (f'(validation text: {data_entropy:.3f})' if data_entropy is not None else '') + '. "all samples": the '
        f"cell's {min(n_samples, default=0)}+ samples pooled, so its CI is sampling error only (the seeds' "
        'spread is in the column before). Masks left at t = 0 by schedules with alpha(0) < 1 were filled by: '
        f"{', '.join(fills) or '-'} (sample.py --final_fill).",
    ]
    md = md_table(head, cells_md, notes)
    atomic_write_text(md, os.path.join(out, 'study.md'))
    cell_plots(table, out)
    print(md)


def cell_plots(table, out):
    """cells.png: the uniform NELBO and gen PPL of every cell, a point and its 95% CI over seeds,
    grouped by schedule, uniform and entropy masking side by side, GPT a reference line; and
    cell_curves.png: val_nelbo (GPT: val_loss) during training, mean and 95% band per cell."""
    plt = pyplot(print)
    if plt is None:
        return
    diff = [c for c in table if c['objective'] != 'gpt']
    gpt = next((c for c in table if c['objective'] == 'gpt'), None)
    def group(c):   # a cell's x tick label
        return f"block L={c['block_len']}\n{c['schedule']}" if c['block_len'] else c['schedule']
    groups = list(dict.fromkeys(map(group, diff)))                      # in order
    colors = {'uniform': 'tab:blue', 'entropy': 'tab:orange'}
    fig, axes = plt.subplots(2, 1, figsize=(10, 7.5), sharex=True)
    for ax, key, title in ((axes[0], 'nats', 'uniform-masking NELBO on validation (nats/char)'),
                           (axes[1], 'gen_ppl', 'generative perplexity of samples (GPT seed-0 judge)')):
        for c in diff:
            if c[key] is None:
                continue
            x = groups.index(group(c)) + {'uniform': -0.12, 'entropy': 0.12}.get(c['masking'], 0)
            ax.errorbar(x, c[key], yerr=c[key + '_ci95'] or 0, fmt='o', capsize=4, color=colors.get(c['masking'], 'gray'),
                        label=f"{c['masking']} masking")
        if gpt and gpt[key] is not None:
            ax.axhline(gpt[key], color='black', ls='--', lw=1, label=f"GPT {gpt[key]:.3g} ({'exact NLL' if key == 'nats' else 'its own samples'})")
            if gpt[key + '_ci95']:
                ax.axhspan(gpt[key] - gpt[key + '_ci95'], gpt[key] + gpt[key + '_ci95'], color='black', alpha=0.08, lw=0)
        handles, labels = ax.get_legend_handles_labels()
        keep = dict(zip(labels, handles))
        ax.legend(keep.values(), keep.keys(), loc='upper left', bbox_to_anchor=(1.01, 1), fontsize=8)
        ax.set(title=title + ': mean and 95% CI over seeds')
        ax.grid(alpha=0.3, axis='y')
    axes[1].set_xticks(range(len(groups)), groups, fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, 'cells.png'), dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), sharey=True)
    palette = plt.get_cmap('tab10').colors
    scheds = sorted({c['schedule'] for c in diff if not c['block_len']})
    for ax, masking in zip(axes, ('uniform', 'entropy')):
        for c in table:
            if c['objective'] == 'diffusion' and c['masking'] != masking:
                continue
            curves = []
            for p in c['paths']:
                tr = training_log(p)
                curves.append([(q['step'], q.get('val_nelbo', q['val_loss'])) for q in tr['val']])
            n = min(map(len, curves)) if curves else 0
            if not n:
                continue
            steps = [curves[0][i][0] for i in range(n)]
            pts = [seed_ci([cv[i][1] for cv in curves]) for i in range(n)]
            mean = [m for m, _ in pts]
            h = [ci or 0.0 for _, ci in pts]
            if c['objective'] == 'gpt':
                color, ls, label = 'black', '--', 'GPT (val_loss, exact NLL)'
            elif c['block_len']:
                lens = sorted({b['block_len'] for b in diff if b['block_len']})
                color, ls = ('dimgray', 'silver', 'gray')[lens.index(c['block_len']) % 3], ':'
                label = f"block diffusion L={c['block_len']} {c['schedule']}"
            else:
                color, ls, label = palette[scheds.index(c['schedule']) % 10], '-', c['schedule']
            ax.plot(steps, mean, color=color, ls=ls, label=label)
            ax.fill_between(steps, [m - e for m, e in zip(mean, h)], [m + e for m, e in zip(mean, h)], color=color,
                            alpha=0.15, lw=0)
        ax.set(title=f'{masking} masking: val_nelbo in the training log', xlabel='step')
        ax.grid(alpha=0.3)
    axes[0].set_ylabel('nats/char (mean, 95% band over seeds)')
    lo = min((c['val_nelbo'] or c['val_loss'] or 9) for c in table)
    axes[0].set_ylim(lo - 0.15, lo + 1.2)
    legend = {}
    for ax in axes:  # both panels' lines in one legend (block diffusion is in the uniform one only)
        legend.update((lab, h) for h, lab in zip(*ax.get_legend_handles_labels()))
    axes[1].legend(legend.values(), legend.keys(), loc='upper left', bbox_to_anchor=(1.01, 1), fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, 'cell_curves.png'), dpi=110)
    plt.close(fig)
