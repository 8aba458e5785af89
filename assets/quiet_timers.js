// Loaded first, into the page's head, by localchat/ui/app.py (before Gradio's own modules run).
//
// Gradio's status tracker keeps an elapsed-time counter running on requestAnimationFrame, and in
// this Gradio version the loop goes on at 60 frames a second for trackers that are hidden and idle:
// measured in Chromium on this project's machines, ~5% of a core for a page doing nothing, taken from
// the engine's threads on a two-core machine (localchat/bench/page.py measures the page's cost). This
// runs those counters once a second instead, all of them on one timer and without asking for a frame:
// a counter only sets a number, and where that changes what a visible tracker shows, the change asks
// for its own frame. Asking for one per counter kept ~4 frames a second going while a reply streamed
// (a Chromium trace: each a full main-thread lifecycle and commit, nothing drawn; benchmarks/NOTES.md
// session 13). Every other requestAnimationFrame is untouched. The counter is recognised by the text of
// its callback; if a Gradio release changes it, nothing here matches and the page behaves as Gradio ships it.
(() => {
  const raf = window.requestAnimationFrame.bind(window);
  const cancel = window.cancelAnimationFrame.bind(window);
  const isElapsedCounter = (cb) => {
    try {
      const src = Function.prototype.toString.call(cb);
      return src.length < 120 && src.includes('performance.now()') && src.includes('/1e3') && /\b\w+&&\w+\(\)\}$/.test(src);
    } catch (_) {
      return false;
    }
  };
  const TICK_MS = 1000;
  const waiting = new Map();  // our id -> counter callback, run at the next tick
  let next = -1, tick = null;
  const stats = (window.lcQuietTimers = {runs: 0});  // counters run so far (tests/test_ui_browser.py reads it)
  const runTick = () => {
    tick = null;
    const due = [...waiting.values()];
    waiting.clear();
    const now = performance.now();
    for (const cb of due) {
      stats.runs += 1;
      try { cb(now); } catch (err) { setTimeout(() => { throw err; }); }  // reported, and the others still run
    }
  };
  window.requestAnimationFrame = (cb) => {
    if (typeof cb !== 'function' || !isElapsedCounter(cb)) return raf(cb);
    const id = next--;
    waiting.set(id, cb);
    if (tick === null) tick = setTimeout(runTick, TICK_MS);
    return id;
  };
  window.cancelAnimationFrame = (id) => {
    if (waiting.delete(id)) return;
    cancel(id);
  };
})();
