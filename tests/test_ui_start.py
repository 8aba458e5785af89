"""How the page starts a reply (localchat/ui/streaming.py server_start_reply): a plain request from the page
script, refused with a clear message when it cannot run, one reply at a time per tab, and a reply that starts
a conversation gives the page that conversation. (In Chromium: tests/test_ui_browser.py.)"""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import gradio as gr
import pytest

from localchat.ui.layout import build_layout
from localchat.ui import streaming
from localchat.ui.streaming import ReplyHandlers

pytestmark = pytest.mark.filterwarnings("ignore::Warning:gradio.*")

SETTINGS = [0.0, 1.0, 0, 0.0, 1.0, 6, "", "", 1, 0]  # greedy, 6 tokens (render.SETTING_NAMES order)


def tab_request(session: str = "session-a"):
    return SimpleNamespace(session_hash=session, query_params={})


@pytest.fixture
def handlers(chat_service):
    h = ReplyHandlers(chat_service())
    with gr.Blocks():
        h.w = build_layout()
    return h


def open_tab(h: ReplyHandlers, tab: str = "t" * 32, session: str = "session-a") -> str:
    h.on_load(tab_request(session), tab)
    return tab


def start(h: ReplyHandlers, tab: str, **arg) -> dict:
    return h.server_start_reply({"tab": tab, "settings": SETTINGS, "conv": None, "leaf": "", **arg})


def finish(h: ReplyHandlers, answer: dict, conv_id, session: str = "session-a") -> dict:
    h.replies[answer["key"]].ended.wait(30)
    out = list(h.finish_reply(tab_request(session), SimpleNamespace(_data={"key": answer["key"]}), conv_id))
    return out[-1]


def refusal(h: ReplyHandlers, conv_id=None, session: str = "session-a") -> str:
    with pytest.raises(gr.Error) as caught:
        list(h.on_refused(tab_request(session), conv_id))
    return caught.value.message


def test_a_send_that_starts_a_conversation_gives_the_page_that_conversation(handlers):
    h = handlers
    tab = open_tab(h)
    answer = start(h, tab, action="send", text="Hello there", system="Be brief.")
    assert set(answer) == {"key", "frame", "conv", "new_chat"} and answer["new_chat"] is True
    assert f'data-stream="{answer["key"]}"' in answer["frame"] and "Hello there" in answer["frame"]
    conv = h.store.get_conversation(answer["conv"])
    assert conv.system_prompt == "Be brief." and conv.title
    # The reply ended before the page asked for its conversation: the end gives it.
    final = finish(h, answer, None)
    assert final[h.w.conv_state] == answer["conv"] and final[h.w.title_box] == conv.title
    assert [m.role for m in h.store.current_path(answer["conv"])] == ["user", "assistant"]


def test_on_started_names_the_new_conversation_even_if_asked_before_the_start(handlers, monkeypatch):
    """The page asks for a first message's conversation as it sends the start (assets/ui.js): on_started
    waits for the start to register, then names it; a refused start answers it at once, and another tab's
    start is not this tab's conversation."""
    h = handlers
    tab = open_tab(h)
    asked: list[dict] = []
    waiting = threading.Thread(target=lambda: asked.append(h.on_started(tab_request())))
    waiting.start()
    time.sleep(0.3)  # on_started is waiting: nothing has started yet
    assert waiting.is_alive() and asked == []
    answer = start(h, tab, action="send", text="A long one", settings=[*SETTINGS[:5], 400, *SETTINGS[6:]])
    waiting.join(10)
    assert asked[0][h.w.conv_state] == answer["conv"] and h.w.conv_list in asked[0]
    assert asked[0][h.w.title_box] == h.store.get_conversation(answer["conv"]).title
    monkeypatch.setattr(streaming, "STARTED_WAIT_S", 0.3)
    assert h.on_started(tab_request("session-b")) == {}
    h.on_stop(tab_request())
    final = finish(h, answer, answer["conv"])
    assert h.w.chat in final and "Stopped" in final[h.w.status]

    waiting = threading.Thread(target=lambda: asked.append(h.on_started(tab_request())))
    monkeypatch.setattr(streaming, "STARTED_WAIT_S", 30)
    t0 = time.monotonic()
    waiting.start()
    assert "error" in start(h, tab, action="send", text=" ")
    waiting.join(10)
    assert asked[1] == {} and time.monotonic() - t0 < 5


@pytest.mark.parametrize("arg, message", [
    ({"action": "send", "text": "  "}, "The message is empty"),
    ({"action": "send", "text": "hi", "settings": [1, 2]}, "The page sent no settings"),
    ({"action": "send", "text": "hi", "settings": None}, "The page sent no settings"),
    ({"action": "send", "text": "hi", "settings": [*SETTINGS[:5], -3, *SETTINGS[6:]]}, "max"),
    ({"action": "regenerate"}, "There is no reply to regenerate yet"),
    ({"action": "regenerate_message", "message_id": 99999}, "not in this conversation"),
    ({"action": "edit", "message_id": 99999, "text": "x"}, "not in this conversation"),
    ({"action": "edit", "message_id": 1, "text": ""}, "The edited message is empty"),
    ({"action": "rm -rf"}, "something the app does not do"),
])
def test_a_start_that_cannot_run_is_refused_with_its_reason(handlers, arg, message):
    h = handlers
    tab = open_tab(h)
    answer = start(h, tab, **arg)
    assert set(answer) == {"error"} and message.lower() in answer["error"].lower()
    assert refusal(h) == answer["error"]
    assert h.replies == {} and h.store.list_conversations() == []


def test_a_refusal_shows_the_chat_as_saved(handlers):
    """A regenerate of a reply deleted meanwhile (another tab) is refused, and the page gets the chat as it is."""
    h = handlers
    tab = open_tab(h)
    first = start(h, tab, action="send", text="Question")
    finish(h, first, first["conv"])
    user, reply = h.store.current_path(first["conv"])
    answer = start(h, tab, action="regenerate_message", conv=first["conv"], message_id=reply.id + 1000)
    assert "not in this conversation" in answer["error"]
    shown = h.on_refused(tab_request(), first["conv"])
    views = next(shown)
    assert "Question" in views[h.w.chat]
    with pytest.raises(gr.Error, match="not in this conversation"):
        next(shown)


def test_a_page_the_app_does_not_know_is_told_to_reload(handlers):
    h = handlers
    open_tab(h)
    for tab in ("u" * 32, None, 7, ""):
        answer = start(h, tab, action="send", text="hi")
        assert "reload" in answer["error"]
    assert "Reload the page" in refusal(h, session="unknown-session")
    h.on_unload(tab_request())  # a closed tab's id leads nowhere afterwards
    assert "reload" in start(h, "t" * 32, action="send", text="hi")["error"]
    assert h.replies == {}


def test_two_starts_at_once_from_one_tab_start_one_reply(handlers):
    h = handlers
    tab = open_tab(h)
    conv = h.store.create_conversation("two clicks")
    long = [*SETTINGS[:5], 400, *SETTINGS[6:]]
    answers: list[dict] = []
    go = threading.Barrier(2)

    def click():
        go.wait()
        answers.append(start(h, tab, action="send", text="one message", conv=conv.id, settings=long))

    threads = [threading.Thread(target=click) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted("key" in a for a in answers) == [False, True]
    assert "still being written" in next(a["error"] for a in answers if "error" in a)
    # The refusal is a message; the chat is not rendered again beside the reply being written.
    shown = h.on_refused(tab_request(), conv.id)
    with pytest.raises(gr.Error, match="still being written"):
        next(shown)
    h.on_stop(tab_request())
    finish(h, next(a for a in answers if "key" in a), conv.id)
    assert [m.role for m in h.store.list_messages(conv.id)] == ["user", "assistant"]
    # Another tab is not held up by this one's reply.
    other = open_tab(h, "o" * 32, "session-b")
    assert "key" in start(h, other, action="send", text="me too", conv=conv.id)


def test_regenerate_and_edit_continue_on_the_branch_the_page_shows(handlers):
    h = handlers
    tab = open_tab(h)
    first = start(h, tab, action="send", text="Question")
    conv_id = first["conv"]
    finish(h, first, conv_id)
    user, reply = h.store.current_path(conv_id)
    answer = start(h, tab, action="regenerate", conv=conv_id, leaf=str(reply.id))
    assert answer["new_chat"] is False
    finish(h, answer, conv_id)
    assert h.store.siblings(reply.id).count == 2
    answer = start(h, tab, action="edit", conv=conv_id, message_id=user.id, text="Question, edited")
    finish(h, answer, conv_id)
    path = h.store.current_path(conv_id)
    assert path[0].content == "Question, edited" and h.store.siblings(user.id).count == 2
    # ↻ on the first reply: a third sibling of it, and the branch then continues from it.
    answer = start(h, tab, action="regenerate_message", conv=conv_id, message_id=reply.id)
    finish(h, answer, conv_id)
    assert h.store.siblings(reply.id).count == 3 and h.store.current_path(conv_id)[0].id == user.id
