"""
bench_prepare.py: GPT-2 tokenisation throughput of prepare.py's parallel path against a plain
single-process encode_ordinary loop over the same documents, measured side by side in one run.

    python bench/bench_prepare.py                   # ~30 s on 2 cores
    python bench/bench_prepare.py --copies=32 --num_proc=8

Wall-clock rates depend on what else runs on the machine; CPU seconds (this process and its
workers) are printed too. The documents are Tiny Shakespeare's paragraphs (blank-line separated), the file replicated
`copies` times (falls back to WikiText-2's test set, then to a generated text). Four timings,
best of `repeats`, interleaved so that load from other processes hits them alike:
  plain      for d in docs: enc.encode_ordinary(d)            (one process, no EOT, no arrays)
  ideal      the plain loop in num_proc forked processes, each over its share of the documents:
             the best any process-parallel tokeniser can do on this machine at this moment
  parallel   prepare.tokenize(prepare.doc_batches(docs), pool)  (worker processes, pool start included)
  end-to-end prepare.py --dataset=fineweb_edu on a parquet file of the same documents: the
             `datasets` reader, the workers, shard writing and fsync
"""
import contextlib
import io
import multiprocessing
import os
import resource
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

import prepare as P  # noqa: E402
from runtime import configure, run_cli  # noqa: E402

# -----------------------------------------------------------------------------
copies = 8                      # times the source text is replicated
num_proc = 0                    # tokeniser processes for the parallel path; 0 = one per CPU core
repeats = 3                     # timings per method; the best is reported
end_to_end = True               # also time the whole prepare.py run on a parquet file
# -----------------------------------------------------------------------------


def source_text():
    for path in (P.SHARED_SHAKESPEARE, os.path.join(P.SHARED, 'data', 'wikitext-2', 'test.txt')):
        if os.path.exists(path):
            with open(path, encoding='utf-8') as f:
                return f.read(), path
    import random
    rnd = random.Random(0)
    words = ['the', 'king', 'and', 'queen', 'of', 'my', 'lord', 'thou', 'art', 'good', 'love', 'night']
    paras = [' '.join(rnd.choice(words) for _ in range(rnd.randint(5, 60))) for _ in range(8000)]
    return '\n\n'.join(paras), 'generated text'


def encode_share(enc, docs):
    for d in docs:
        enc.encode_ordinary(d)


def cpu_seconds():
    """CPU time of this process and of its reaped children (the pool's workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def timed(fn, results):
    t, c = time.perf_counter(), cpu_seconds()
    n = fn()
    results.append((time.perf_counter() - t, cpu_seconds() - c, n))


def main():
    cfg = configure(globals(), verbose=False)
    text, where = source_text()
    docs = [p for p in text.split('\n\n') if p.strip()] * cfg['copies']
    enc = P.gpt2_encoding()
    P._ENC = enc  # as prepare_bpe does before forking its workers
    n_proc = cfg['num_proc'] or len(os.sched_getaffinity(0))
    print(f"{len(docs):,} documents ({sum(map(len, docs)) / 1e6:.1f} MB) from {where} x{cfg['copies']}; "
          f"{n_proc} worker process(es) on {os.cpu_count()} CPU(s), load average {os.getloadavg()[0]:.1f} "
          "(other processes' load slows wall-clock rates)", flush=True)

    def plain():
        return sum(len(enc.encode_ordinary(d)) for d in docs)

    def ideal():  # n_proc forked processes, each a plain loop over its share: no tasks, no IPC
        ctx = multiprocessing.get_context('fork')
        procs = [ctx.Process(target=encode_share, args=(enc, docs[i::n_proc])) for i in range(n_proc)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        return results['plain'][0][2]  # the same documents as plain (timed first)

    def parallel():
        with P.worker_pool(n_proc) as pool:
            return sum(len(toks) for toks, _ in P.tokenize(P.doc_batches(docs), pool))

    tmp = tempfile.mkdtemp(prefix='bench_prepare_')
    parquet = os.path.join(tmp, 'docs.parquet')
    if cfg['end_to_end']:
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.table({'text': docs}), parquet)
        import datasets  # noqa: F401  (imported once here, not inside the first timing)

    def end_to_end():
        P.main(['--dataset=fineweb_edu', f'--input={parquet}', f'--data_dir={tmp}', f'--num_proc={n_proc}',
                '--val_tokens=1', '--shard_size=1e6', '--resume=false'])  # val: 1 token (the count is of every shard)
        return sum(os.path.getsize(os.path.join(tmp, 'fineweb_edu', f)) // 2
                   for f in os.listdir(os.path.join(tmp, 'fineweb_edu')) if f.endswith('.bin'))

    methods = {'plain': plain, 'ideal': ideal, 'parallel': parallel}
    if cfg['end_to_end']:
        methods['end-to-end'] = end_to_end
    results = {k: [] for k in methods}
    for _ in range(cfg['repeats']):
        for name, fn in methods.items():
            with contextlib.redirect_stdout(io.StringIO()):  # prepare.py's own progress lines
                timed(fn, results[name])
    rate = {}
    n_plain = results['plain'][0][2]
    for name, runs in results.items():
        dt, cpu, n = min(runs)
        rate[name] = n / dt
        print(f"{name:>10}: {n:,} tokens in {dt:.2f} s wall = {rate[name] / 1e6:.2f}M tokens/s "
              f"({cpu:.2f} CPU s, {n / cpu / 1e6:.2f}M tokens per CPU s)")
    assert results['parallel'][0][2] == n_plain + len(docs), 'parallel path: one EOT per document extra'
    print(f"ratio parallel / plain: {rate['parallel'] / rate['plain']:.2f}x (ideal split / plain: "
          f"{rate['ideal'] / rate['plain']:.2f}x, what this machine allows now)"
          + (f"; end-to-end / plain: {rate['end-to-end'] / rate['plain']:.2f}x" if 'end-to-end' in rate else ''))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == '__main__':
    run_cli(main)
