/* race.js: replays a race exported by `python visualize.py --export=web/frames.json`.

   The race comes from window.RACE_FRAMES (set by frames.js, which a page opened from file://
   can load), else frames.json fetched over http(s), else a file the user picks or drops.
   URL parameters: ?frames=PATH.js|PATH.json  ?frame=N|end (slider position to show first)
                   ?autoplay=1  ?speed=5|15|0 (seconds the replay lasts; 0 = real time)

   The slider walks through every frame of every model in the order they were produced
   (by measured elapsed time), so one slider step is one sampler step of one model. */
'use strict';
(function () {
  const $ = (id) => document.getElementById(id);
  const params = new URLSearchParams(location.search);
  const FORMAT = 'diffusion-race/1';
  const TICK_MS = 33;

  let race = null;    // the exported object: {format, mask, summary, runs: [{name, label, frames, ...}]}
  let events = [];    // {t, r, k}: frame k (> 0) of run r, recorded t seconds into sampling
  let pos = 0;        // slider position: how many events have happened
  let clock = 0;      // seconds of measured sampling time shown
  let timer = null;   // setInterval id while playing
  let lastNow = 0;    // performance.now() at the previous tick
  let cache = [];     // per run {k, pieces}: the text of each position at frame k (null = MASK)

  function fmtSeconds(t) {
    return t < 1 ? `${Math.round(1000 * t)} ms` : `${t.toFixed(2)} s`;
  }

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  // ---- loading ----

  function showLoader(message) {
    $('loader').hidden = false;
    $('loader-message').textContent = message;
  }

  function fetchJson(url) {
    fetch(url)
      .then((r) => { if (!r.ok) throw new Error(`HTTP ${r.status}`); return r.json(); })
      .then(start, (e) => showLoader(`Could not load ${url} (${e.message}).`));
  }

  function readFile(file) {
    file.text().then((text) => {
      let data;
      try { data = JSON.parse(text); } catch (e) { return showLoader(`${file.name}: not JSON (${e.message}).`); }
      start(data);
    });
  }

  function load() {
    const src = params.get('frames');
    if (src && /\.json$/i.test(src)) return fetchJson(src);
    if (src) {
      window.RACE_FRAMES = undefined;
      const s = document.createElement('script');
      s.src = src;
      s.onload = () => (window.RACE_FRAMES ? start(window.RACE_FRAMES)
                                           : showLoader(`${src} did not define window.RACE_FRAMES.`));
      s.onerror = () => showLoader(`Could not load ${src}.`);
      document.body.appendChild(s);
      return;
    }
    if (window.RACE_FRAMES) return start(window.RACE_FRAMES);
    if (location.protocol === 'http:' || location.protocol === 'https:') return fetchJson('frames.json');
    showLoader('No race loaded yet: frames.js was not found beside this page.');
  }

  // ---- state ----

  function start(data) {
    if (!data || data.format !== FORMAT || !Array.isArray(data.runs) || !data.runs.length) {
      return showLoader(`Not a race exported by visualize.py (expected format ${FORMAT}).`);
    }
    pause();
    race = data;
    $('loader').hidden = true;
    events = [];
    race.runs.forEach((run, r) => run.frames.forEach((f, k) => { if (k > 0) events.push({ t: f.t, r, k }); }));
    events.sort((a, b) => a.t - b.t || a.r - b.r || a.k - b.k);
    cache = race.runs.map(() => ({ k: -1, pieces: [] }));
    buildPanels();
    $('slider').max = String(events.length);
    $('controls').hidden = false;
    const speed = params.get('speed');
    if (speed !== null && [...$('speed').options].some((o) => o.value === speed)) $('speed').value = speed;
    const f = params.get('frame');
    seek(f === 'end' ? events.length : Math.min(events.length, Math.max(0, parseInt(f || '0', 10) || 0)));
    if (params.get('autoplay') === '1') play();
  }

  function piecesAt(r, k) {
    // replay the changes of frames 0..k; incremental when moving forward
    const run = race.runs[r];
    let c = cache[r];
    if (k < c.k) c = cache[r] = { k: -1, pieces: [] };
    for (let j = c.k + 1; j <= k; j++) {
      const f = run.frames[j];
      c.pieces.length = f.length;
      for (const [i, s] of f.set) c.pieces[i] = s;
    }
    c.k = k;
    return c.pieces;
  }

  function frameIndices() {
    const ks = race.runs.map(() => 0);
    for (let i = 0; i < pos; i++) ks[events[i].r] = events[i].k;
    return ks;
  }

  function winner() {
    if (race.runs.length < 2) return -1;
    let best = 0;
    race.runs.forEach((run, r) => { if (run.seconds < race.runs[best].seconds) best = r; });
    return best;
  }

  // ---- drawing ----

  function buildPanels() {
    const main = $('panels');
    main.replaceChildren();
    const about = [];
    race.runs.forEach((run, r) => {
      const panel = el('section', 'panel');
      panel.id = `panel-${r}`;
      panel.dataset.name = run.name;
      const head = el('div', 'head');
      head.append(el('span', 'name', run.name), el('span', 'label', run.label), el('span', 'badge', 'winner'));
      const stats = el('span', 'stats');
      stats.append(el('span', 'step'), el('span', 'passes'), el('span', 'time'));
      head.append(stats);
      const bar = el('div', 'bar');
      bar.append(el('div', 'fill'));
      const text = el('pre', 'text');
      text.id = `text-${r}`;
      panel.append(head, bar, text);
      main.append(panel);
      if (run.params) {
        about.push(`${run.name}: ${run.n_layer} layers × ${run.n_embd} wide, ` +
                   `${(run.params / 1e6).toFixed(2)}M parameters, checkpoint step ${run.checkpoint_step}`);
      }
    });
    const n = race.runs[0].new_tokens;
    $('subtitle').textContent = `${n} tokens each. ` + about.join('; ') + (about.length ? '.' : '');
  }

  function renderRun(r, k, done, best) {
    const run = race.runs[r];
    const f = run.frames[k];
    const last = run.frames[run.frames.length - 1];
    const finished = k === run.frames.length - 1;
    const panel = $(`panel-${r}`);
    panel.dataset.frame = String(k);
    panel.dataset.step = String(f.step);
    panel.classList.toggle('finished', finished);
    panel.classList.toggle('winner', done && r === best);
    panel.querySelector('.step').textContent = `step ${f.step}/${last.step}`;
    panel.querySelector('.passes').textContent = `${f.passes} passes`;
    panel.querySelector('.time').textContent = fmtSeconds(finished ? run.seconds : Math.min(clock, run.seconds));

    const pieces = piecesAt(r, k);
    // prompt positions are those given from the start (an infilled [MASK] span of the prompt is not)
    const fixed = new Set(run.frames[0].set.filter(([i, s]) => s !== null && i < run.prompt_len).map(([i]) => i));
    const fresh = new Set(k > 0 ? f.set.filter(([, s]) => s !== null).map(([i]) => i) : []);
    const frag = document.createDocumentFragment();
    let cls = null;
    let buf = '';
    let revealed = 0;
    const flush = () => {  // always a span: a <pre> whose first child is text starting with a newline
      if (buf) frag.append(el('span', cls, buf));  // would lose that newline when serialised and parsed again
      buf = '';
    };
    for (let i = 0; i < pieces.length; i++) {
      const s = pieces[i];
      const c = s === null || s === undefined ? 'mask'
        : fixed.has(i) ? 'prompt' : fresh.has(i) ? 'new' : '';
      if (c !== cls) { flush(); cls = c; }
      buf += c === 'mask' ? race.mask : s;
      if (c !== 'mask' && !fixed.has(i)) revealed++;
    }
    flush();
    panel.querySelector('.text').replaceChildren(frag);
    panel.querySelector('.fill').style.width = `${(100 * Math.min(1, revealed / run.new_tokens)).toFixed(1)}%`;
  }

  function render() {
    const ks = frameIndices();
    const done = pos === events.length;
    const best = winner();
    race.runs.forEach((run, r) => renderRun(r, ks[r], done, best));
    $('slider').value = String(pos);
    $('position').textContent = `${pos} / ${events.length}`;
    $('result').hidden = !done;
    $('result').textContent = race.summary;
    $('play').textContent = timer ? 'Pause' : done ? 'Replay' : 'Play';
    document.body.dataset.state = done ? 'done' : timer ? 'playing' : 'paused';
  }

  // ---- playback ----

  function seek(p) {
    pos = p;
    clock = p > 0 ? events[p - 1].t : 0;
    render();
  }

  function tick() {
    const now = performance.now();
    const end = events.length ? events[events.length - 1].t : 0;
    const seconds = Number($('speed').value);
    const scale = seconds > 0 ? end / seconds : 1;   // sampling seconds per replay second
    clock += (now - lastNow) / 1000 * scale;
    lastNow = now;
    while (pos < events.length && events[pos].t <= clock) pos++;
    if (pos === events.length) {
      clock = end;
      pause();
      return;
    }
    render();
  }

  function play() {
    if (!race) return;
    if (pos === events.length) seek(0);
    lastNow = performance.now();
    timer = setInterval(tick, TICK_MS);
    render();
  }

  function pause() {
    if (timer) clearInterval(timer);
    timer = null;
    if (race) render();
  }

  $('play').addEventListener('click', () => (timer ? pause() : play()));
  $('slider').addEventListener('input', (e) => { pause(); seek(Number(e.target.value)); });
  $('file').addEventListener('change', (e) => { if (e.target.files[0]) readFile(e.target.files[0]); });
  document.addEventListener('dragover', (e) => e.preventDefault());
  document.addEventListener('drop', (e) => {
    e.preventDefault();
    if (e.dataTransfer.files[0]) readFile(e.dataTransfer.files[0]);
  });
  document.addEventListener('keydown', (e) => {
    if (!race || ['SELECT', 'TEXTAREA'].includes(e.target.tagName) || e.target.type === 'file') return;
    if (e.key === ' ') {
      e.preventDefault();
      if (timer) pause(); else play();
    } else if (e.target !== $('slider') && (e.key === 'ArrowRight' || e.key === 'ArrowLeft')) {
      pause();
      seek(Math.max(0, Math.min(events.length, pos + (e.key === 'ArrowRight' ? 1 : -1))));
    }
  });

  load();
}());
