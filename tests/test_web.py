"""web/: the race page in a real headless Chromium, opened from file:// with frames.js written
by visualize.py's export: the slider shows changing text, the last frame is the exported
final text, autoplay runs to the end, and a screenshot lands in artifacts/web_race.png.

Chromium is driven through its command line only (--dump-dom, --screenshot) with
--virtual-time-budget, so that timers run deterministically fast; no Python package needed."""
import contextlib
import itertools
import os
import shutil
import subprocess
from html.parser import HTMLParser

import pytest
import torch

import visualize
from runtime import Config, settings_of
from conftest import REPO

BROWSERS = ('chromium', 'chromium-browser', 'google-chrome', 'google-chrome-stable')
CHROME = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
pytestmark = pytest.mark.skipif(CHROME is None, reason='no Chromium on the PATH (Debian: apt-get install chromium)')
FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
         '--disable-background-networking', '--disable-component-update', '--disable-sync', '--hide-scrollbars',
         '--mute-audio']
LENGTH, STEPS = 24, 6
LAUNCHES = itertools.count()


@pytest.fixture(scope='module')
def page(tiny_runs, tmp_path_factory):
    """(folder holding a copy of web/ with an exported frames.json + frames.js, the exported data)."""
    root = tmp_path_factory.mktemp('web')
    for name in ('index.html', 'style.css', 'race.js'):
        shutil.copy(os.path.join(REPO, 'web', name), root / name)
    c = Config(settings_of(vars(visualize)), diffusion_dir=tiny_runs['diffusion'], gpt_dir=tiny_runs['gpt'],
               length=LENGTH, steps=STEPS, sampler='confidence', duration=5.0)
    runs = visualize.race(c, torch.device('cpu'))
    visualize.write_export(runs, str(root / 'frames.json'))
    data = visualize.race_json(runs)
    assert (root / 'frames.js').exists()
    return root, data


def chrome(root, query, *args, budget=2000):
    """Headless Chromium on root/index.html?query: the DOM after budget ms of virtual time, or
    with args=('--screenshot=PATH', ...) a picture of the page."""
    args = args or ('--dump-dom',)
    url = (root / 'index.html').as_uri() + ('?' + query if query else '')
    profile = root / f'profile-{next(LAUNCHES)}'  # a fresh profile every launch
    r = subprocess.run([CHROME, *FLAGS, f'--user-data-dir={profile}', f'--virtual-time-budget={budget}', *args, url],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


class Page(HTMLParser):
    """What a person sees: text of the panels' <pre>s, #position, #result; panel and body attributes."""
    WATCH = ('position', 'result')

    def __init__(self, html):
        super().__init__()
        self.texts, self.panels, self.ids, self.body = {}, {}, {}, {}
        self._open = []  # [(key, depth)] of watched elements being read
        self._depth = 0
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == 'body':
            self.body = a
        if tag == 'section' and a.get('id', '').startswith('panel-'):
            self.panels[a['data-name']] = a
        key = a.get('id')
        if key and (key.startswith('text-') or key in self.WATCH):
            self._open.append((key, self._depth))
            self.ids[key] = '' if key in self.WATCH else self.ids.get(key, '')
            self.texts.setdefault(key, '')
        self._depth += 1

    def handle_endtag(self, tag):
        self._depth -= 1
        if self._open and self._open[-1][1] == self._depth:
            self._open.pop()

    def handle_data(self, data):
        for key, _ in self._open:
            self.texts[key] += data

    def text(self, i):
        return self.texts[f'text-{i}']


def events(data):
    """(t, run, frame) of every frame after the first, in the order the slider walks them."""
    return sorted((f['t'], r, k) for r, run in enumerate(data['runs']) for k, f in enumerate(run['frames']) if k)


def test_slider_frames_and_last_frame(page):
    root, data = page
    names = [r['name'] for r in data['runs']]
    ev = events(data)
    n = len(ev)
    first, last = Page(chrome(root, 'frame=0')), Page(chrome(root, 'frame=end'))
    for i, run in enumerate(data['runs']):
        k = len(run['frames']) // 2  # this run's middle frame, shown at the slider position just after it
        mid = Page(chrome(root, f"frame={ev.index((run['frames'][k]['t'], i, k)) + 1}"))
        assert (first.panels[run['name']]['data-frame'], mid.panels[run['name']]['data-frame'],
                last.panels[run['name']]['data-frame']) == ('0', str(k), str(len(run['frames']) - 1))
        assert last.text(i) == run['final_text']  # the page shows exactly the exported final text
        assert len({first.text(i), mid.text(i), last.text(i)}) == 3  # the text changes across frames
    assert first.text(names.index('diffusion')) == data['mask'] * LENGTH  # everything masked at the start
    assert first.texts['position'] == f'0 / {n}' and last.texts['position'] == f'{n} / {n}'
    assert last.texts['result'] == data['summary'] and last.body['data-state'] == 'done'


def test_autoplay_runs_to_the_end(page):
    root, data = page
    n_events = len(events(data))
    early = Page(chrome(root, 'autoplay=1', budget=1500))  # 1.5 s of a 5 s replay
    done = Page(chrome(root, 'autoplay=1', budget=20000))
    assert early.body['data-state'] == 'playing'
    assert 0 < int(early.texts['position'].split(' / ')[0]) < n_events
    assert done.body['data-state'] == 'done' and done.texts['position'] == f'{n_events} / {n_events}'
    for i, run in enumerate(data['runs']):
        assert done.text(i) == run['final_text']
    slowest = max(range(len(data['runs'])), key=lambda i: data['runs'][i]['seconds'])
    assert early.text(slowest) != data['runs'][slowest]['final_text']  # still running at 1.5 s


def test_no_frames_shows_how_to_make_them(page, tmp_path):
    root, _ = page
    for name in ('index.html', 'style.css', 'race.js'):
        shutil.copy(root / name, tmp_path / name)
    html = chrome(tmp_path, '')
    p = Page(html)
    assert 'python visualize.py --export=web/frames.json' in html and 'id="loader" hidden' not in html
    assert p.texts['position'] == '' and 'text-0' not in p.texts


def test_screenshot(page):
    root, data = page
    n_events = len(events(data))
    out = os.path.join(REPO, 'artifacts', 'web_race.png')
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.remove(out)
    chrome(root, f'frame={n_events * 2 // 3}', f'--screenshot={out}', '--window-size=1100,700')
    with open(out, 'rb') as f:
        assert f.read(8) == b'\x89PNG\r\n\x1a\n'
    try:
        from PIL import Image
    except ImportError:
        return  # Pillow is optional: the PNG was checked by its header only
    with Image.open(out) as im:
        assert im.size == (1100, 700) and len(im.convert('RGB').getcolors(1 << 20)) > 20  # not a blank page
