// localchat's page script, loaded by localchat/ui/app.py through launch(js=...).
//
// The conversation block (localchat/ui/thread.py) holds every message of every branch; this script
// shows one branch at a time (switching needs no request: the tree is in the page), keeps the
// overview, the comparison and the context gauge in step with it, edits messages in place, draws the
// memory panel (assets/memory_panel.js) on canvases, and stops a reply on Escape.
// Each gr.HTML block registers itself in window.lcParts from its js_on_load (localchat/ui/layout.py)
// and calls window.lcChanged(part) after the server changes it. Nothing here inserts markup built
// from text: text is set with textContent, and the only markup comes rendered (escaped) from the server.
() => {
  if (window.lcStarted) return;
  window.lcStarted = true;
  const parts = (window.lcParts = window.lcParts || {});
  const $ = (sel, root = document) => root.querySelector(sel);
  const $$ = (sel, root = document) => Array.from(root.querySelectorAll(sel));
  const el = (tag, cls, text) => {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    return node;
  };

  // ------------------------------------------------------------------ branches
  const conv = () => $('#lc-chat .lc-conv');
  function tree() {
    const byId = new Map(), kids = new Map();
    for (const node of $$('#lc-chat .lc-msg')) {
      const id = +node.dataset.id, parent = node.dataset.parent === '' ? null : +node.dataset.parent;
      byId.set(id, {node, id, parent, tokens: +node.dataset.tokens || 0});
      if (!kids.has(parent)) kids.set(parent, []);
      kids.get(parent).push(id);
    }
    return {byId, kids};
  }
  function pathTo(t, leaf) {
    const out = [];
    for (let cur = leaf; cur !== null && t.byId.has(cur); cur = t.byId.get(cur).parent) out.push(cur);
    return out.reverse();
  }
  // Where a branch resumes: the newest message under `id` (as Store.switch_branch does).
  function newestLeaf(t, id) {
    let best = id;
    for (const stack = [id]; stack.length;) {
      const m = stack.pop();
      if (m > best) best = m;
      for (const k of t.kids.get(m) || []) stack.push(k);
    }
    return best;
  }
  window.lcLeaf = () => (conv() ? conv().dataset.leaf || '' : '');

  // Show the branch through `id` at once; tell the server afterwards (the next message continues there).
  function showBranch(id) {
    const c = conv();
    if (!c) return;
    const t = tree();
    if (!t.byId.has(id)) return;
    const leaf = newestLeaf(t, id);
    const on = new Set(pathTo(t, leaf));
    for (const {node, id: mid} of t.byId.values()) {
      const hide = !on.has(mid);
      if (node.hidden !== hide) node.hidden = hide;
    }
    c.dataset.leaf = String(leaf);
    pathChanged(t, on);
    const server = parts.chat && parts.chat.server;
    if (server && server.switch_branch) Promise.resolve(server.switch_branch({conv: +c.dataset.conv, leaf})).catch(() => {});
  }
  // Show the branch up to `id` only (a reply being regenerated or a message being edited goes away as its
  // replacement starts streaming below); the server is not told: the new reply moves the branch.
  function showUpTo(id) {
    const c = conv();
    if (!c) return;
    const t = tree();
    const on = new Set(id === null ? [] : pathTo(t, id));
    for (const {node, id: mid} of t.byId.values()) node.hidden = !on.has(mid);
    pathChanged(t, on);
  }
  function hideLast() {
    const shown = $$('#lc-chat .lc-msg:not([hidden])');
    const last = shown[shown.length - 1];
    if (last && last.classList.contains('lc-assistant')) showUpTo(last.dataset.parent === '' ? null : +last.dataset.parent);
  }
  function currentPath() {
    const c = conv(), t = tree();
    return {t, on: new Set(c && c.dataset.leaf ? pathTo(t, +c.dataset.leaf) : [])};
  }
  function pathChanged(t, on) {
    for (const b of $$('#lc-overview .lc-ov-node')) b.classList.toggle('lc-on-path', on.has(+b.dataset.node));
    for (const card of $$('#lc-compare .lc-card[data-id]')) card.classList.toggle('lc-current', on.has(+card.dataset.id));
    drawGauge(t, on);
  }

  // ------------------------------------------------------------------ context gauge
  function drawGauge(t, on) {
    const box = $('#lc-gauge .lc-gauge') || $('#lc-gauge');
    const c = conv();
    if (!box || !c) return;
    const ctx = +c.dataset.ctx || 0;
    let used = 0;
    for (const id of on) used += t.byId.get(id).tokens;
    const maxInput = $('#lc-max-tokens input');
    const next = maxInput ? +maxInput.value || 0 : 0;
    box.replaceChildren();
    if (!ctx || !on.size) return;
    const share = Math.min(1, used / ctx);
    const bar = el('div', 'lc-gauge-bar'), fill = el('i');
    fill.style.width = (100 * share).toFixed(1) + '%';
    bar.append(fill);
    let note = `context: ${used.toLocaleString()} of ${ctx.toLocaleString()} tokens (${(100 * share).toFixed(0)}%)`;
    let level = '';
    if (used >= ctx) { level = 'lc-danger'; note += ': full. Start a new chat or go back to an earlier branch.'; }
    else if (used + next > ctx) { level = 'lc-warn'; note += `: the next reply may stop early (room for ${(ctx - used).toLocaleString()} tokens, max tokens is ${next}).`; }
    else if (share >= 0.85) { level = 'lc-warn'; note += ': nearly full.'; }
    box.className = 'lc-gauge ' + level;
    box.append(bar, el('span', 'lc-gauge-text', note));
  }

  // ------------------------------------------------------------------ editing in place
  function startEdit(msg) {
    if (msg.querySelector('.lc-editor')) return;
    const body = msg.querySelector('.lc-body');
    const box = el('div', 'lc-editor');
    const area = el('textarea');
    area.value = msg.dataset.src || '';
    area.rows = Math.min(12, Math.max(2, area.value.split('\n').length));
    const save = el('button', 'lc-act lc-edit-save', 'Save as a new branch');
    const cancel = el('button', 'lc-act lc-edit-cancel', 'Cancel');
    const close = () => { box.remove(); body.hidden = false; };
    save.addEventListener('click', () => {
      if (!area.value.trim()) { area.focus(); return; }
      const text = area.value;
      close();
      startReply('edit', {message_id: +msg.dataset.id, text}, () => showUpTo(msg.dataset.parent === '' ? null : +msg.dataset.parent));
    });
    cancel.addEventListener('click', close);
    area.addEventListener('keydown', (e) => {
      if (e.key === 'Enter' && !e.shiftKey) { e.preventDefault(); save.click(); }
      if (e.key === 'Escape') { e.preventDefault(); e.stopPropagation(); close(); }
    });
    body.hidden = true;
    box.append(area, el('div', 'lc-editor-actions'));
    box.lastChild.append(save, cancel);
    body.after(box);
    area.focus();
  }

  // ------------------------------------------------------------------ clicks
  document.addEventListener('click', (e) => {
    const target = e.target.closest('button');
    if (!target) return;
    if (target.matches('#lc-chat .lc-go[data-go]')) return showBranch(+target.dataset.go);
    if (target.matches('#lc-overview .lc-ov-node')) return showBranch(+target.dataset.node);
    if (target.matches('#lc-compare .lc-continue')) return showBranch(+target.dataset.continue);
    const act = target.dataset.act;
    if (!act) return;
    const msg = target.closest('.lc-msg');
    if (act === 'close-compare') { const s = $('#lc-compare .lc-compare'); if (s) s.hidden = true; return; }
    if (!msg || !parts.chat) return;
    const id = +msg.dataset.id;
    if (act === 'edit') startEdit(msg);
    else if (act === 'regen') startReply('regenerate_message', {message_id: id}, () => showUpTo(msg.dataset.parent === '' ? null : +msg.dataset.parent));
    else if (act === 'copy' && navigator.clipboard) navigator.clipboard.writeText(msg.dataset.src || '').catch(() => {});
    else if (act === 'compare') {
      const open = $('#lc-compare .lc-compare');
      const c = conv();
      const sibs = tree().kids.get(msg.dataset.parent === '' ? null : +msg.dataset.parent) || [];
      if (open && sibs.includes(+open.dataset.of)) { open.hidden = false; open.scrollIntoView({block: 'nearest'}); }
      else parts.chat.trigger('lc_compare', {message_id: id, leaf: c ? +c.dataset.leaf : null});
    }
  });

  // Escape stops the reply being written (the reply so far is kept).
  document.addEventListener('keydown', (e) => {
    if (e.key !== 'Escape' || e.defaultPrevented) return;
    if (!$('#lc-live .lc-live')) return;
    const stop = $('#lc-stop');
    if (stop) { e.preventDefault(); stop.click(); }
  });

  // ------------------------------------------------------------------ starting a reply
  // Send, regenerate and edit start their reply with a plain request (localchat/ui/streaming.py
  // server_start_reply), not a Gradio event: an event's statuses cost the page tens of ms on the engine's
  // cores and put ~40 ms between the click and the request. The answer is the reply's frame, shown through
  // the live block's props as if the server had set it; the settings are the ones Gradio's change events
  // keep in window.lcSettings (localchat/ui/app.py). A refusal is shown by a Gradio event (on_refused).
  // What the reply replaces (`hide`) goes in the same frame as the reply's first tokens: nothing is laid out
  // while the engine computes them, and a refused start leaves the chat as it was.
  const setPart = (part, html) => { if (part && part.props && part.props.value !== html) part.props.value = html; };
  let starting = false;
  async function startReply(action, data = {}, hide = null) {
    const live = parts.live;
    if (starting || !live || !live.server || !live.server.start_reply) return;
    const c = conv();
    const arg = {tab: window.lcTab || '', action, conv: c && c.dataset.conv ? +c.dataset.conv : null,
                 leaf: window.lcLeaf(), settings: window.lcSettings || null, system: window.lcSystem || '', ...data};
    starting = true;
    let answer = null;
    try {
      const call = live.server.start_reply(arg);
      // A first message also asks for its new conversation (the sidebar, the title) at once: Gradio's event
      // then runs while the engine computes the first tokens, not while the reply streams (on_started).
      if (action === 'send' && arg.conv === null) live.trigger('lc_started', {});
      answer = await call;
    } catch (_) { answer = null; }
    finally { starting = false; }
    if (!answer || typeof answer.key !== 'string') return live.trigger('lc_refused', {});
    if (hide) hide();
    if (action === 'send') {
      const box = $('#lc-input textarea');
      if (box && box.value === data.text) { box.value = ''; box.dispatchEvent(new Event('input', {bubbles: true})); }
    }
    setPart(parts.compare, '');
    setPart(parts.status, '');
    setPart(live, answer.frame);
    following(answer.key);  // the block's watch fires only for values that came from the server
  }
  window.lcStart = (action, data) => startReply(action, data, action === 'regenerate' ? hideLast : null);

  // ------------------------------------------------------------------ following the reply
  const thread = () => $('#lc-thread');
  let stick = true;  // keep the newest text in view unless the user scrolled up
  function follow() {
    const box = thread();
    if (box && stick) box.scrollTop = box.scrollHeight;
  }
  document.addEventListener('scroll', (e) => {
    const box = thread();
    if (box && e.target === box) stick = box.scrollTop + box.clientHeight >= box.scrollHeight - 40;
  }, true);

  // Following a reply: the skeleton arrives once (localchat/ui/compare.py, with data-stream), then its
  // samples' bodies come on the reply's own event stream (localchat/ui/live.py), at most three a second.
  const stream = {key: null, source: null};
  function applySamples(state) {
    for (const s of state.samples || []) {
      const box = $(`#lc-live .lc-streaming[data-index="${s.index}"]`);
      if (!box) continue;
      const body = $('.lc-body', box), stats = $('.lc-stats', box);
      if (!body) continue;
      // Finished paragraphs change rarely, the last one at every update: only it is parsed and painted
      // again. Both are rendered and escaped by the server (localchat/ui/markdown.py).
      if (!body.lcParts) { body.replaceChildren(el('div', 'lc-done'), el('div', 'lc-tail')); body.lcParts = {head: ''}; }
      const [done, tail] = body.children;
      if (s.head !== body.lcParts.head) { done.innerHTML = s.head; body.lcParts.head = s.head; }
      tail.innerHTML = s.tail;
      if (stats) stats.textContent = `${s.tokens} tokens`;
    }
    follow();
  }
  // When the reply ends (or its stream is lost) the page asks once for the chat as saved
  // (localchat/ui/streaming.py finish_reply); Gradio holds no event open while a reply streams.
  function followStream(key) {
    if (stream.source) stream.source.close();
    stream.key = key;
    const panel = memory.streamQuery ? memory.streamQuery() : '';
    const source = stream.source = new EventSource(`lc/live/${encodeURIComponent(key)}${panel ? '?' + panel : ''}`);
    let finished = false;
    const finish = () => {
      source.close();
      if (finished) return;
      finished = true;
      if (parts.live && parts.live.trigger) parts.live.trigger('lc_finish', {key});
    };
    source.onmessage = (e) => {
      if (stream.key !== key) return source.close();
      let state;
      try { state = JSON.parse(e.data); } catch (_) { return; }
      applySamples(state);
      if (state.memory && memory.fromStream) memory.fromStream(state.memory);
      if (state.done) finish();
    };
    source.onerror = () => { if (stream.key === key) finish(); else source.close(); };
  }
  function liveChanged() {
    const live = $('#lc-live .lc-live[data-stream]');
    following(live ? live.dataset.stream : null);
  }
  function following(key) {
    if (key && key !== stream.key) followStream(key);
    if (!key && stream.source) { stream.source.close(); stream.source = null; stream.key = null; }
    document.documentElement.classList.toggle('lc-writing', !!key);  // assets/ui.css: the caret while it writes
    requestAnimationFrame(follow);
  }

  function chatChanged() {
    const c = conv();
    const {t, on} = currentPath();
    pathChanged(t, on);
    const url = new URL(location.href);
    const id = c && c.dataset.conv;
    if (id) url.searchParams.set('c', id); else url.searchParams.delete('c');
    if (url.href !== location.href) history.replaceState(null, '', url.href);
    stick = true;
    requestAnimationFrame(follow);
  }

  // ------------------------------------------------------------------ memory panel (assets/memory_panel.js)
  const memory = window.lcMemoryPanel ? window.lcMemoryPanel(parts) : {changed: () => {}, data: () => null};
  window.lcMemory = memory.data;  // what the panel shows now (tests and the bench read it)

  // ------------------------------------------------------------------ blocks registering
  window.lcChanged = (part) => {
    if (part === 'chat') chatChanged();
    else if (part === 'live') liveChanged();
    else if (part === 'overview' || part === 'compare') { const {t, on} = currentPath(); pathChanged(t, on); }
    else if (part === 'mem') memory.changed();
  };
  window.lcMount = (part) => window.lcChanged(part);
  for (const part of Object.keys(parts)) window.lcMount(part);
  document.addEventListener('input', (e) => { if (e.target.closest('#lc-max-tokens')) { const {t, on} = currentPath(); drawGauge(t, on); } });
  const focus = () => { const box = $('#lc-input textarea'); if (box) box.focus(); else setTimeout(focus, 200); };
  focus();
}
