"""
prepare.py: turn text into the token files diffusion.py and gpt.py train on.

    python prepare.py                                  # Tiny Shakespeare, characters (~2 s)
    python prepare.py --dataset=shakespeare_char --input=path/to/input.txt

Every dataset is written in one format: data/<dataset>/meta.json plus uint16 token files
listed in it per split ("splits": {"train": {"shards": [...], "tokens": [...]}, "val": ...}).
meta.json also says how to decode: "tokenizer" ('char' with "chars", or 'gpt2'),
"vocab_size" (real tokens; MASK is id vocab_size and is added by the model).
"""
import json
import os
import sys
import urllib.error
import urllib.request

import numpy as np

from diffusion import UserError, atomic_write_text, configure, run_cli

# -----------------------------------------------------------------------------
dataset = 'shakespeare_char'    # which dataset to prepare (see DATASETS)
input = ''                      # local text file to use instead of downloading
data_dir = 'data'               # output root: data/<dataset>/
val_fraction = 0.1              # last fraction of the text kept for validation
# -----------------------------------------------------------------------------

SHAKESPEARE_URL = 'https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt'
SHAKESPEARE_CHARS = 1115394
SHARED_SHAKESPEARE = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'shared', 'data',
                                  'tinyshakespeare.txt')


def download(url, path):
    """Fetch url to path (atomically); a clear error when there is no network."""
    print(f"downloading {url}")
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            data = r.read()
    except (urllib.error.URLError, OSError) as e:
        raise UserError(f"cannot download {url} ({getattr(e, 'reason', e)}); no network? "
                        f"pass a local copy with --input=PATH") from None
    tmp = path + '.tmp'
    with open(tmp, 'wb') as f:
        f.write(data)
    os.replace(tmp, path)


def write_split(out, name, ids, dtype=np.uint16):
    """Write one split as a single token file; returns its meta entry."""
    arr = np.asarray(ids, dtype=dtype)
    path = os.path.join(out, f'{name}.bin')
    tmp = path + '.tmp'
    arr.tofile(tmp)
    os.replace(tmp, path)
    return {'shards': [f'{name}.bin'], 'tokens': [int(len(arr))]}


def write_meta(out, meta):
    atomic_write_text(json.dumps(meta, indent=1) + '\n', os.path.join(out, 'meta.json'))


def shakespeare_text(path):
    if path:
        if not os.path.exists(path):
            raise UserError(f"--input={path}: no such file")
    elif os.path.exists(SHARED_SHAKESPEARE):
        path = SHARED_SHAKESPEARE
    else:
        path = os.path.join(data_dir, 'tinyshakespeare.txt')
        if not os.path.exists(path):
            os.makedirs(data_dir, exist_ok=True)
            download(SHAKESPEARE_URL, path)
    with open(path, encoding='utf-8') as f:
        return f.read(), path


def prepare_shakespeare_char():
    """Character-level Tiny Shakespeare: 65 characters, 90/10 train/val split (as nanoGPT)."""
    text, source = shakespeare_text(input)
    chars = sorted(set(text))
    stoi = {ch: i for i, ch in enumerate(chars)}
    ids = np.array([stoi[ch] for ch in text], dtype=np.uint16)
    n_val = int(len(ids) * val_fraction)
    out = os.path.join(data_dir, 'shakespeare_char')
    os.makedirs(out, exist_ok=True)
    splits = {'train': write_split(out, 'train', ids[:len(ids) - n_val]),
              'val': write_split(out, 'val', ids[len(ids) - n_val:])}
    write_meta(out, {'dataset': 'shakespeare_char', 'tokenizer': 'char', 'vocab_size': len(chars),
                     'chars': ''.join(chars), 'dtype': 'uint16', 'source': os.path.abspath(source),
                     'splits': splits})
    print(f"{source}: {len(text):,} characters, vocabulary {len(chars)} (+ MASK = id {len(chars)})")
    print(f"wrote {out}: train {splits['train']['tokens'][0]:,} tokens, val {splits['val']['tokens'][0]:,} tokens")


DATASETS = {'shakespeare_char': prepare_shakespeare_char}


def main():
    configure(globals(), choices={'dataset': tuple(DATASETS)}, verbose=False)
    DATASETS[dataset]()


if __name__ == '__main__':
    run_cli(main)
