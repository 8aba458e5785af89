// localchat browser UI. Loaded by localchat/ui/app.py through launch(js=...): put the cursor in
// the message box once the page is ready.
() => {
  const focus = () => {
    const box = document.querySelector("#lc-input textarea");
    if (box) { box.focus(); } else { setTimeout(focus, 200); }
  };
  focus();
}
