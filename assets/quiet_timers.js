// Loaded first, into the page's head, by localchat/ui/app.py (before Gradio's own modules run).
//
// Gradio's status tracker keeps an elapsed-time counter running on requestAnimationFrame, and in
// this Gradio version the loop goes on at 60 frames a second for trackers that are hidden and idle:
// measured in Chromium on this project's machines, ~5% of a core for a page doing nothing, taken from
// the engine's threads on a two-core machine (localchat/bench/page.py measures the page's cost). This
// runs that counter's frames once a second instead; every other requestAnimationFrame is untouched.
// The counter is recognised by the text of its callback; if a Gradio release changes it, nothing here
// matches and the page behaves as Gradio ships it.
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
  const slow = new Map();  // our id -> timer
  let next = -1;
  window.requestAnimationFrame = (cb) => {
    if (typeof cb !== 'function' || !isElapsedCounter(cb)) return raf(cb);
    const id = next--;
    slow.set(id, setTimeout(() => { slow.delete(id); raf(cb); }, 1000));
    return id;
  };
  window.cancelAnimationFrame = (id) => {
    if (slow.has(id)) { clearTimeout(slow.get(id)); slow.delete(id); return; }
    cancel(id);
  };
  window.lcQuietTimers = true;
})();
