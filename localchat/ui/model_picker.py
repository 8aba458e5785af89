"""The model picker in the page's settings: the registry's models with what is downloaded, and a button
that switches the app to the chosen one (downloading it first, with its progress shown here).

The switch itself is localchat/chat/engine_switch.py's ModelSwitcher (a new engine, then the old one
released); this module only draws it. Every text from the registry or an error is escaped.
"""

from __future__ import annotations

import html
import time
from dataclasses import dataclass
from typing import Any

import gradio as gr

POLL_S = 0.25  # how often the page's progress line is redrawn while a switch runs


@dataclass
class PickerWidgets:
    dropdown: Any
    use_btn: Any
    status: Any


def build_model_picker() -> PickerWidgets:
    """Create the picker's widgets (call inside the settings' layout block)."""
    with gr.Group(elem_id="lc-model-picker"):
        dropdown = gr.Dropdown(choices=[], value=None, label="Model", elem_id="lc-model", interactive=True)
        use_btn = gr.Button("Use this model", size="sm", elem_id="lc-model-use")
        status = gr.HTML("", elem_id="lc-model-status")
    return PickerWidgets(dropdown, use_btn, status)


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def choice_label(entry) -> str:
    from localchat.model.catalog import human_bytes

    state = f"downloaded, {human_bytes(entry.size_bytes)}" if entry.downloaded else "not downloaded"
    family = entry.architecture.split(" (")[0]  # the details are for `localchat models list`
    known = [part for part in (family, entry.parameters) if part and part != "?"]
    return " · ".join([entry.name, *known, state])


def status_html(status, running: str | None = None) -> str:
    """One line for where a switch is (or which model runs, when none is under way)."""
    from localchat.model.catalog import human_bytes

    if status is None or (status.finished and running and status.model == running and status.phase == "ready"):
        text = f"Running {running}." if running else ""
        return f'<div class="lc-model-line" data-phase="idle">{_e(text)}</div>' if text else ""
    phase = status.phase
    if phase == "downloading":
        total = status.total_bytes
        pct = 100 * status.done_bytes / total if total else 0.0
        if total:
            text = f"Downloading {status.model}: {human_bytes(status.done_bytes)} of {human_bytes(total)} ({pct:.0f}%)"
        else:
            text = f"Downloading {status.model}: asking the Hub for its files…"
        bar = f'<progress max="100" value="{pct:.1f}"></progress>'
    elif phase in ("starting", "loading"):
        text, bar = f"Loading {status.model}… ({time.monotonic() - status.started:.0f} s)", "<progress></progress>"
    elif phase == "ready":
        text, bar = f"Switched: {status.message}.", ""
    else:
        text, bar = f"Could not switch to {status.model}: {status.message}", ""
    return f'<div class="lc-model-line" data-phase="{_e(phase)}">{_e(text)}{bar}</div>'


class ModelPicker:
    """The picker's event handlers over a ModelSwitcher (None: this app cannot switch, e.g. a remote engine)."""

    def __init__(self, switcher, service) -> None:
        self.switcher = switcher
        self.service = service

    def running(self) -> str:
        return self.service.info.model_name

    def choices(self):
        from localchat.model.catalog import catalog

        try:
            entries = catalog()
        except ValueError as exc:  # a broken user registry: say so, keep the page working
            return gr.Dropdown(choices=[], value=None, info=f"the model registry cannot be read: {exc}")
        names = [e.name for e in entries]
        value = self.running() if self.running() in names else None
        return gr.Dropdown(choices=[(choice_label(e), e.name) for e in entries], value=value,
                           interactive=self.switcher is not None)

    def on_load(self):
        return self.choices(), status_html(self.switcher.status if self.switcher else None, self.running())

    def on_use(self, name):
        """Switch to `name`, redrawing the progress line until the new model serves (a generator)."""
        if self.switcher is None:
            raise gr.Error("This app cannot switch models (it drives a remote engine).", print_exception=False)
        if not isinstance(name, str) or not name:
            raise gr.Error("Choose a model in the list first.", print_exception=False)
        if name == self.running() and (self.switcher.status is None or self.switcher.status.finished):
            yield gr.skip(), status_html(None, self.running())
            return
        try:
            status = self.switcher.begin(name)
        except ValueError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        while not status.done.wait(POLL_S):
            yield gr.skip(), status_html(status)
        if status.phase == "failed":
            gr.Warning(f"Could not switch to {name}: {status.message}")
        yield self.choices(), status_html(status)


def wire_model_picker(w: PickerWidgets, picker: ModelPicker, demo, after_switch=None, quiet: dict | None = None) -> None:
    """Connect the picker's events; `after_switch` (fn, outputs) runs once a switch ends (the memory panel).
    `quiet`: the page's options for its events (localchat/ui/app.py), else progress is only hidden."""
    quiet = quiet or {"show_progress": "hidden"}
    demo.load(picker.on_load, None, [w.dropdown, w.status], **quiet)
    event = w.use_btn.click(picker.on_use, [w.dropdown], [w.dropdown, w.status], concurrency_limit=1, **quiet)
    if after_switch is not None:
        fn, outputs = after_switch
        event.then(fn, None, outputs, **quiet)
