"""Gradio's queue waits for work instead of polling (localchat/ui/quiet_queue.py): an idle page's server
wakes rarely, and a new event, or a job that frees a worker for the next, still starts at once. The
fallback timeout is set far beyond the tests' limits, so a missing wake-up fails them."""

from __future__ import annotations

import time

import gradio as gr
import pytest
from gradio_client import Client

from localchat import settings
from localchat.ui.quiet_queue import IdleWait, quiet_queue

FALLBACK_S = 60.0  # what an event would wait if nothing woke the queue
LIMIT_S = 15.0  # each result must come well before that


@pytest.fixture
def quiet_demo(monkeypatch):
    monkeypatch.setattr(settings, "UI_QUEUE_IDLE_S", FALLBACK_S)

    def slow_echo(text: str) -> str:
        time.sleep(0.3)
        return text.upper()

    with gr.Blocks() as demo:
        box, out = gr.Textbox(), gr.Textbox()
        # one at a time: the second of two events can only start when the first one's job ends
        gr.Button().click(slow_echo, box, out, api_name="echo", concurrency_limit=1)
    demo.queue()
    assert quiet_queue(demo)
    demo.launch(prevent_thread_lock=True, quiet=True, server_name="127.0.0.1")
    try:
        yield demo
    finally:
        demo.close()


def test_an_idle_queue_waits_for_work_and_wakes_for_each_event(quiet_demo):
    idle = quiet_demo._queue.sleep_when_free
    assert isinstance(idle, IdleWait)
    client = Client(quiet_demo.local_url, verbose=False)
    assert client.submit("first", api_name="/echo").result(timeout=LIMIT_S) == "FIRST"
    time.sleep(0.3)
    before = idle.waits
    time.sleep(1.5)
    assert idle.waits - before <= 1  # Gradio's own loop looked 1,500 times in that time, the 20 ms poll 75
    jobs = [client.submit(word, api_name="/echo") for word in ("second", "third")]
    assert [job.result(timeout=LIMIT_S) for job in jobs] == ["SECOND", "THIRD"]


def test_without_gradios_hooks_the_queue_polls(monkeypatch):
    with gr.Blocks() as demo:
        gr.Button().click(lambda: None)
    demo.queue()
    monkeypatch.setattr(type(demo._queue), "process_events", None)
    assert not quiet_queue(demo)
    assert demo._queue.sleep_when_free == settings.UI_QUEUE_POLL_S and not isinstance(demo._queue.sleep_when_free, IdleWait)
