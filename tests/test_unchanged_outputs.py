"""Outputs an event leaves unchanged skip Gradio's postprocessing (localchat/ui/unchanged_outputs.py): the page
gets the same data as with Gradio's own postprocessing, and no component is rebuilt for a left-out output."""

from __future__ import annotations

import asyncio
import copy

import gradio as gr
import pytest
from gradio.state_holder import SessionState

from localchat.ui.unchanged_outputs import UNCHANGED, skip_unchanged


def _demo():
    with gr.Blocks() as demo:
        text, html, state = gr.Textbox("typed"), gr.HTML("<p>old</p>"), gr.State(1)
        radio, file = gr.Radio(choices=[("a", "1")], value="1"), gr.File(visible=False)
        outputs = [text, html, state, radio, file]
        gr.Button().click(lambda: None, None, outputs)
    block_fn = next(iter(demo.fns.values()))
    return demo, block_fn, dict(zip(("text", "html", "state", "radio", "file"), outputs))


def _cases(o):
    return {
        "one output named": {o["html"]: "<p>new</p>"},
        "several, with a property update and the state": {o["html"]: "<p>x</p>", o["text"]: gr.update(visible=False), o["state"]: 5},
        "a component given as the update": {o["radio"]: gr.Radio(choices=[("a", "1"), ("b", "2")], value="2")},
        "all skipped": gr.skip(),
        "a list with skips": ["", gr.skip(), gr.skip(), gr.skip(), gr.skip()],
        "every output": ["t", "<p>h</p>", 3, "1", None],
    }


def _run(postprocess, block_fn, predictions, demo):
    state = SessionState(demo)
    data = asyncio.run(postprocess(block_fn, copy.copy(predictions), state))
    return data, state


@pytest.mark.parametrize("case", list(_cases(_demo()[2])))
def test_the_page_gets_what_gradios_own_postprocessing_gives(case):
    demo, block_fn, o = _demo()
    predictions = _cases(o)[case]
    gradio_data, gradio_state = _run(demo.postprocess_data, block_fn, predictions, demo)
    assert skip_unchanged(demo)
    ours, our_state = _run(demo.postprocess_data, block_fn, predictions, demo)
    assert len(ours) == len(gradio_data) == len(block_fn.outputs)
    for mine, theirs in zip(ours, gradio_data):
        if mine == UNCHANGED:  # left out: Gradio's own update changes nothing either (no value; for gr.HTML the
            assert isinstance(theirs, dict) and theirs.get("__type__") == "update"  # marker again, as its props)
            assert set(theirs) <= {"__type__", "props"} and theirs.get("props", UNCHANGED) == UNCHANGED
        else:
            assert mine == theirs
    assert our_state.state_data == gradio_state.state_data  # the State's value stays on the server either way


def test_no_component_is_rebuilt_for_an_output_left_out():
    demo, block_fn, o = _demo()
    gradio_state = _run(demo.postprocess_data, block_fn, {o["html"]: "<p>new</p>"}, demo)[1]
    # Gradio's own postprocessing replaces every left-out output's component with a new one
    assert gradio_state[o["text"]._id] is not o["text"]
    assert skip_unchanged(demo)
    data, state = _run(demo.postprocess_data, block_fn, {o["html"]: "<p>new</p>"}, demo)
    assert data[1] == "<p>new</p>" and data[0] == data[3] == data[4] == UNCHANGED
    assert state[o["text"]._id] is o["text"] and state[o["radio"]._id] is o["radio"] and state[o["file"]._id] is o["file"]


def test_without_what_it_relies_on_postprocessing_is_left_as_it_is(monkeypatch):
    import gradio.blocks

    demo, _, _ = _demo()
    monkeypatch.delattr(gradio.blocks, "convert_component_dict_to_list")
    assert not skip_unchanged(demo)
    assert "postprocess_data" not in vars(demo)
