// localchat's memory panel, loaded into the page's head by localchat/ui/app.py; assets/ui.js starts it
// with window.lcMemoryPanel(parts), where parts.mem is the panel's gr.HTML (its element and server calls).
//
// It draws localchat/ui/memory_panel.py's data: the figures (in blocks and MiB), the pool on a canvas
// (one cell per block, or several blocks a cell for pools of tens of thousands), who owns each used block
// (a colour per live sequence, orange when shared; clicking a sequence dims the others), the text of a
// block under the pointer (asked from the server), and a timeline of blocks used, cached and shared with
// forks, copy-on-write copies and preemptions marked. It polls the server once a second, and only while
// the panel can be seen; while a reply streams, the reply's stream brings the data instead. Text is only
// ever set with textContent.
window.lcMemoryPanel = (parts) => {
  const $ = (sel, root = document) => root.querySelector(sel);
  const el = (tag, cls, text) => {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    return node;
  };
  const mem = {data: null, samples: [], events: [], now: null, highlight: null, timer: null, texts: new Map(), busy: false};
  const PALETTE = ['#2f9e44', '#7048e8', '#c2255c', '#1098ad', '#5c940d', '#4263eb', '#ae3ec9', '#0ca678', '#a61e4d', '#364fc7'];
  const STATE_COLOR = {f: '#d7dce3', c: '#5aa9e6', s: '#e8590c', u: '#2f9e44'};
  const pct = (x) => (100 * (+x || 0)).toFixed(1) + '%';
  const mib = (x) => { x = +x || 0; return x.toFixed(x >= 100 ? 0 : x >= 1 ? 1 : 2) + ' MiB'; };

  function memRoot() { return parts.mem && parts.mem.element && $('.lc-mem', parts.mem.element); }
  function memFromServerValue() {
    const root = memRoot();
    if (!root || !root.dataset.panel) return;
    try { mem.data = JSON.parse(root.dataset.panel); } catch (_) { return; }
    mem.samples = mem.data.timeline.samples || [];
    mem.events = mem.data.timeline.events || [];
    mem.now = mem.data.timeline.now;
    mem.texts.clear();
    drawMemory();
  }
  function ownersOf(data) {
    const owners = new Map();
    data.seqs.forEach((s, i) => { s.color = PALETTE[i % PALETTE.length]; for (const b of s.blocks) { if (!owners.has(b)) owners.set(b, []); owners.get(b).push(s); } });
    return owners;
  }
  // The panel's elements are made once and then changed in place. A poll comes every second while a
  // reply streams, and on a two-core machine what the browser spends is taken from the engine: rebuilding
  // the whole view each time cost ~13 ms of the page's main thread a poll; now a poll sets the figures
  // that moved and redraws a canvas only when what it shows changed (the timeline: every poll, it moves).
  function viewOf(root) {
    const made = $('.lc-mem-view', root);  // gone whenever the server sends the panel's HTML again
    if (made) return made.lcView;
    const view = el('div', 'lc-mem-view');
    const v = {title: el('div', 'lc-mem-title'), figs: el('dl', 'lc-figures'), dds: new Map(), sizes: el('p', 'lc-mib'),
               grid: el('div', 'lc-grid-box'), canvas: el('canvas', 'lc-grid-canvas'), tip: el('div', 'lc-tip'),
               seqs: el('div', 'lc-seqs'), tl: el('canvas', 'lc-tl-canvas'), tlLegend: el('div', 'lc-tl-legend'), drawn: {}};
    v.sizes.dataset.figure = 'mib';
    const legend = el('div', 'lc-legend');
    for (const [k, label] of [['f', 'free'], ['c', 'cached (prefix cache)'], ['s', 'shared (ref > 1)']]) {
      const item = el('span'); const sw = el('i', 'lc-swatch'); sw.style.background = STATE_COLOR[k]; item.append(sw, label); legend.append(item);
    }
    v.tip.hidden = true;
    v.grid.append(v.canvas, v.tip);
    const timeline = el('div', 'lc-timeline');
    timeline.append(el('div', 'lc-tl-title', 'recent minutes: blocks used, cached and shared; marks: forks, copy-on-write copies, preemptions'), v.tl, v.tlLegend);
    view.append(v.title, v.figs, v.sizes, legend, v.grid, v.seqs, timeline);
    root.append(view);
    view.lcView = v;
    return v;
  }
  const setText = (node, text) => { if (node.textContent !== text) node.textContent = text; };
  // True when `what` differs from what part `name` last drew (and remembers it).
  const changed = (v, name, what) => {
    const drawn = v.drawn || (v.drawn = {});
    if (drawn[name] === what) return false;
    drawn[name] = what;
    return true;
  };
  function figure(v, name, value, title) {
    let dd = v.dds.get(name);
    if (!dd) {
      const box = el('div', 'lc-fig');
      box.dataset.figure = name;
      if (title) box.title = title;
      dd = el('dd');
      box.append(el('dt', '', name), dd);
      v.figs.append(box);
      v.dds.set(name, dd);
    }
    setText(dd, String(value));
  }
  function drawMemory() {
    const root = memRoot(), d = mem.data;
    if (!root || !d || !d.figures) return;
    const f = d.figures, p = d.peaks || {};
    const owners = ownersOf(d);
    const v = viewOf(root);
    // Read before anything below is written: the layout is still clean then, and the read forces none.
    const width = Math.max(200, (v.grid.clientWidth || 480) - 4);
    for (const hide of [$('.lc-mem-summary', root), $(':scope > .lc-mem-title', root)]) if (hide && !hide.hidden) hide.hidden = true;
    setText(v.title, d.title);
    figure(v, 'blocks_used', `${f.blocks_used} / ${f.blocks_total}`);
    figure(v, 'blocks_cached', f.blocks_cached);
    figure(v, 'blocks_free', f.blocks_free);
    figure(v, 'kv_utilization', pct(f.kv_utilization));
    figure(v, 'sharing_savings', pct(f.sharing_savings), '1 - blocks used / blocks the live sequences would need unshared');
    figure(v, 'cow_copies', f.cow_copies);
    figure(v, 'preemptions', f.preemptions);
    figure(v, 'prefix_hit_rate', `${pct(f.prefix_hit_rate)} (${f.prefix_hit_tokens}/${f.prompt_tokens})`);
    figure(v, 'sequences', f.num_sequences);
    if (p.blocks_used_peak !== undefined) figure(v, 'blocks_used_peak', p.blocks_used_peak);
    if (p.sharing_savings_peak !== undefined) figure(v, 'sharing_savings_peak', pct(p.sharing_savings_peak));
    const m = d.mib || {};
    setText(v.sizes, `pool ${mib(m.pool)} (${f.blocks_total} blocks of ${f.block_size} tokens, ${((m.block || 0) * 1024).toFixed(1)} KiB each) · used ${mib(m.used)} · cached ${mib(m.cached)} · the same sequences unshared: ${mib(m.unshared)}` + (m.unshared > m.used ? ` (sharing saves ${mib(m.unshared - m.used)})` : ''));
    const rows = d.seqs.map((s) => ({seq: s.seq, label: s.label, tokens: s.tokens, blocks: s.blocks.length, shared: s.blocks.filter((x) => owners.get(x).length > 1).length}));
    // The list is rebuilt when its sequences change; a growing reply only changes its line's figures.
    if (changed(v, 'seqs', JSON.stringify([mem.highlight, rows.map((r) => [r.seq, r.label])]))) drawSequences(v, d, rows);
    else rows.forEach((r, i) => { const meta = v.seqs.children[i] && $('.lc-seq-meta', v.seqs.children[i]); if (meta) setText(meta, seqMeta(r)); });
    const tables = d.seqs.map((s) => s.blocks.join(',')).join(';');
    if (changed(v, 'grid', [width, mem.highlight, d.states, tables].join('|'))) drawGrid(v.canvas, v.tip, d, owners, width);
    v.canvas.onmousemove = (e) => hover(e, v.canvas, v.tip, d, owners);  // the newest labels, drawn or not
    v.canvas.onmouseleave = () => { v.tip.hidden = true; };
    if (inWindow(v.tl)) drawTimeline(v.tl, v.tlLegend, width);  // scrolled out of view: drawn when it is back
  }
  const seqMeta = (r) => `${r.tokens} tokens · ${r.blocks} blocks (${r.shared} shared)`;
  function drawSequences(v, d, rows) {
    const list = [];
    if (!d.seqs.length) list.push(el('p', 'lc-note', 'No live sequences: every block is free or cached.'));
    d.seqs.forEach((s, i) => {
      const b = el('button', 'lc-seq' + (mem.highlight === s.seq ? ' lc-active' : ''));
      b.dataset.seq = s.seq;
      const sw = el('i', 'lc-swatch'); sw.style.background = s.color;
      b.append(sw, el('span', 'lc-seq-label', s.label), el('span', 'lc-seq-meta', seqMeta(rows[i])));
      b.addEventListener('click', () => { mem.highlight = mem.highlight === s.seq ? null : s.seq; drawMemory(); });
      list.push(b);
    });
    v.seqs.replaceChildren(...list);
  }
  // A canvas keeps its size from poll to poll: setting it (even to the same value) drops its pixels and
  // its backing store, so it is set only when the size changes.
  function fitCanvas(canvas, width, height) {
    const dpr = window.devicePixelRatio || 1;
    const w = Math.round(width * dpr), h = Math.max(1, Math.round(height * dpr));
    if (canvas.width !== w || canvas.height !== h) {
      canvas.width = w; canvas.height = h;
      canvas.style.width = width + 'px'; canvas.style.height = height + 'px';
    }
    const g = canvas.getContext('2d');
    g.setTransform(dpr, 0, 0, dpr, 0, 0);
    g.globalAlpha = 1;
    g.clearRect(0, 0, width, height);
    return g;
  }
  // One cell per block while blocks fit in GRID_HEIGHT pixels at 1 px or more; beyond that each cell
  // stands for `per` consecutive blocks and shows the busiest state among them (an aggregated grid),
  // so even a pool of hundreds of thousands of blocks is a few thousand rectangles.
  const GRID_HEIGHT = 300;
  function cellColor(d, owners, b) {
    const st = d.states[b], own = owners.get(b);
    if (st !== 'u') return STATE_COLOR[st] || '#888';
    return own && own.length > 1 ? STATE_COLOR.s : own ? own[0].color : STATE_COLOR.u;
  }
  const RANK = {f: 0, c: 1, u: 2};
  // A reply being written changes a few cells a poll: only those are painted again. Painting every cell of
  // the default pool (1,456 blocks) took ~3 ms of the page's main thread a poll, on the engine's cores
  // (a Chromium trace; benchmarks/NOTES.md session 13). A new size, pool or highlight paints the whole grid.
  function drawGrid(canvas, tip, d, owners, width) {
    const n = d.states.length;
    const cell = Math.max(1, Math.min(13, Math.floor(Math.sqrt((width * GRID_HEIGHT) / Math.max(n, 1)))));
    const gap = cell >= 5 ? 1 : 0;
    const cols = Math.max(1, Math.floor(width / cell));
    const per = Math.max(1, Math.ceil(n / (cols * Math.floor(GRID_HEIGHT / cell))));
    const cells = Math.ceil(n / per), rows = Math.ceil(cells / cols);
    const lit = mem.highlight === null ? null : new Set((d.seqs.find((s) => s.seq === mem.highlight) || {blocks: []}).blocks);
    const keys = new Array(cells);
    for (let c = 0; c < cells; c++) {
      let b = c * per;
      if (per > 1) {  // the busiest block of the cell speaks for it
        for (let k = b + 1; k < Math.min(n, (c + 1) * per); k++) if (RANK[d.states[k]] > RANK[d.states[b]]) b = k;
      }
      const color = cellColor(d, owners, b);
      keys[c] = lit && !lit.has(b) ? color + '|dim' : color;
    }
    const shape = [n, cols, cell, per, mem.highlight, window.devicePixelRatio || 1].join(',');
    const before = canvas.lcShape === shape ? canvas.lcKeys : null;
    const g = before ? canvas.getContext('2d') : fitCanvas(canvas, cols * cell, rows * cell);
    if (before) { const dpr = window.devicePixelRatio || 1; g.setTransform(dpr, 0, 0, dpr, 0, 0); }
    Object.assign(canvas.dataset, {blocks: n, cols, cell, per});
    const batches = new Map();  // key -> cells to paint: one fillStyle per colour, however many cells
    let painted = 0;
    for (let c = 0; c < cells; c++) {
      if (before && before[c] === keys[c]) continue;
      painted += 1;
      if (!batches.has(keys[c])) batches.set(keys[c], []);
      batches.get(keys[c]).push(c);
      if (before) g.clearRect((c % cols) * cell, Math.floor(c / cols) * cell, cell, cell);
    }
    for (const [key, list] of batches) {
      const [color, dim] = key.split('|');
      g.globalAlpha = dim ? 0.22 : 1;
      g.fillStyle = color;
      for (const c of list) g.fillRect((c % cols) * cell, Math.floor(c / cols) * cell, cell - gap, cell - gap);
    }
    g.globalAlpha = 1;
    canvas.lcShape = shape;
    canvas.lcKeys = keys;
    canvas.dataset.painted = painted;
  }
  function hover(e, canvas, tip, d, owners) {
    const cols = +canvas.dataset.cols, cell = +canvas.dataset.cell, per = +canvas.dataset.per;
    const r = canvas.getBoundingClientRect();
    const col = Math.floor((e.clientX - r.left) / cell), row = Math.floor((e.clientY - r.top) / cell);
    const first = (row * cols + col) * per;
    if (col >= cols || first < 0 || first >= d.states.length) { tip.hidden = true; return; }
    tip.style.left = (e.clientX - r.left + 12) + 'px';
    tip.style.top = (e.clientY - r.top + 12) + 'px';
    tip.hidden = false;
    if (per > 1) {
      const last = Math.min(d.states.length, first + per) - 1, count = {f: 0, c: 0, u: 0};
      for (let b = first; b <= last; b++) count[d.states[b]] += 1;
      tip.textContent = `blocks ${first}-${last}: ${count.u} used, ${count.c} cached, ${count.f} free`;
      tip.dataset.block = '';
      return;
    }
    const b = first;
    const st = {f: 'free', c: 'cached', u: 'used'}[d.states[b]] || '?';
    const own = owners.get(b) || [];
    const lines = [`block ${b}: ${st}` + (own.length ? `, ref count ${own.length}` : '')];
    if (own.length) lines.push('held by: ' + own.map((s) => s.label).join('; '));
    tip.textContent = lines.join('\n');
    tip.dataset.block = b;
    if (st === 'free') return;
    const show = (text) => { if (tip.dataset.block === String(b)) tip.textContent = lines.join('\n') + '\ntext: ' + JSON.stringify(text); };
    if (mem.texts.has(b)) return show(mem.texts.get(b));
    const server = parts.mem && parts.mem.server;
    if (!server || !server.block_text) return;
    clearTimeout(mem.hoverTimer);
    mem.hoverTimer = setTimeout(() => {
      Promise.resolve(server.block_text({block: b})).then((res) => {
        if (res && typeof res.text === 'string') { mem.texts.set(b, res.text); show(res.text); }
      }).catch(() => {});
    }, 120);
  }
  function drawTimeline(canvas, legend, width) {
    const height = 110;
    const g = fitCanvas(canvas, width, height);
    const samples = mem.samples, events = mem.events;
    // The last five minutes at most; a younger history fills the width (30 s at least).
    const now = mem.now, span = samples.length ? Math.min(300, Math.max(30, now - samples[0][0])) : 300;
    const top = 14, bottom = height - 14;
    canvas.dataset.samples = samples.length; canvas.dataset.events = events.length;
    if (now === null || now === undefined) return;
    const x = (t) => width - ((now - t) / span) * width;
    let peak = 8;
    for (const s of samples) peak = Math.max(peak, s[1], s[2], s[3]);
    const y = (v) => bottom - (v / peak) * (bottom - top);
    g.strokeStyle = '#ccd'; g.lineWidth = 1;
    g.beginPath(); g.moveTo(0, bottom + 0.5); g.lineTo(width, bottom + 0.5); g.stroke();
    const series = [[1, STATE_COLOR.u], [2, STATE_COLOR.c], [3, STATE_COLOR.s]];
    for (const [k, color] of series) {
      g.strokeStyle = color; g.lineWidth = 2; g.beginPath();
      samples.forEach((s, i) => {
        const px = Math.max(0, x(s[0])), py = y(s[k]);
        if (i === 0) g.moveTo(px, py); else { g.lineTo(px, y(samples[i - 1][k])); g.lineTo(px, py); }
      });
      if (samples.length) g.lineTo(width, y(samples[samples.length - 1][k]));
      g.stroke();
    }
    const marks = {fork: '#7048e8', cow: '#e03131', preempt: '#212529'};
    const counts = {fork: 0, cow: 0, preempt: 0};
    for (const [t, kind] of events) {
      if (!(kind in marks)) continue;
      counts[kind] += 1;
      g.fillStyle = marks[kind];
      const row = {fork: 0, cow: 1, preempt: 2}[kind];
      g.fillRect(Math.round(x(t)), row * 4, 2, 4);
    }
    g.fillStyle = '#667'; g.font = '10px sans-serif';
    g.fillText(String(peak), 2, top + 8); g.fillText(span >= 120 ? `-${Math.round(span / 60)} min` : `-${Math.round(span)} s`, 2, height - 2);
    g.fillText('now', width - 22, height - 2);
    if (!changed(legend, 'counts', JSON.stringify(counts))) return;
    legend.replaceChildren();
    const item = (color, text) => { const s = el('span'); const sw = el('i', 'lc-swatch'); sw.style.background = color; s.append(sw, text); legend.append(s); };
    item(STATE_COLOR.u, 'used'); item(STATE_COLOR.c, 'cached'); item(STATE_COLOR.s, 'shared');
    item(marks.fork, `forks ${counts.fork}`); item(marks.cow, `copy-on-write ${counts.cow}`); item(marks.preempt, `preemptions ${counts.preempt}`);
    legend.dataset.forks = counts.fork; legend.dataset.cows = counts.cow; legend.dataset.preemptions = counts.preempt;
  }
  // Poll only while the panel can be seen: a closed panel, one scrolled out of the side column's view and a
  // hidden tab cost the engine nothing. The first poll after it comes back into view draws it at once.
  const seen = new WeakMap();  // element watched -> whether it intersects the window (null: not told yet, assumed seen)
  const watcher = typeof IntersectionObserver === 'function'
    ? new IntersectionObserver((entries) => {
      for (const e of entries) {
        const was = seen.get(e.target);
        seen.set(e.target, e.isIntersecting);
        if (e.isIntersecting && was === false) poll();
      }
    })
    : null;
  function inWindow(node) {
    if (!node) return false;
    if (watcher && !seen.has(node)) { seen.set(node, null); watcher.observe(node); }
    return seen.get(node) !== false;
  }
  function memVisible() {
    const root = parts.mem && parts.mem.element;
    return root && root.getClientRects().length > 0 && document.visibilityState === 'visible' && inWindow(root);
  }
  // The pool now and the timeline since the previous answer (a poll's or the reply stream's).
  function take(d) {
    if (!d || !d.figures) return;
    mem.data = d;
    const fresh = d.timeline || {};
    mem.samples = mem.samples.concat(fresh.samples || []).filter((s) => s[0] >= fresh.now - 300);
    mem.events = mem.events.concat(fresh.events || []).filter((e) => e[0] >= fresh.now - 300);
    mem.now = fresh.now;
    mem.texts.clear();
    if (memVisible()) drawMemory();
  }
  function poll() {
    const server = parts.mem && parts.mem.server;
    if (mem.busy || !server || !server.memory || !memVisible()) return;
    if (performance.now() - mem.streamedAt < 1500) return;  // a reply's stream brings it (localchat/ui/live.py)
    mem.busy = true;
    Promise.resolve(server.memory({since: mem.now})).then(take).catch(() => {}).finally(() => { mem.busy = false; });
  }
  mem.streamedAt = -Infinity;
  mem.timer = setInterval(poll, 1000);
  // A reply starts (assets/ui.js): the query that asks its stream for the panel's data, while the panel is seen.
  // Its data then comes with the reply's text, drawn in the same frame, and the polls wait; a panel opened later
  // polls as before.
  const streamQuery = () => (memVisible() ? `panel=1&since=${encodeURIComponent(mem.now ?? '')}` : '');
  const fromStream = (d) => { mem.streamedAt = performance.now(); take(d); };
  // A poll's data holds only the timeline since the previous poll; readers get the whole timeline drawn.
  const shown = () => mem.data && {...mem.data, timeline: {now: mem.now, samples: mem.samples, events: mem.events}};
  return {changed: memFromServerValue, data: shown, streamQuery, fromStream};

};
