"""The page's event handlers, except the streaming of replies (localchat/ui/streaming.py).

They call ChatService and the Store and render with localchat/ui (thread, compare, overview,
memory_panel); nothing here touches tensors or block ids. Errors the user can fix come back as
gr.Error messages, never as tracebacks. Handlers return dicts {widget: value}: only those widgets
change. The page script's own calls (branch switches, the memory panel's polling, a block's text)
are the `server_*` methods: plain requests, never queued behind a reply.
"""

from __future__ import annotations

import logging
import re
import tempfile
from pathlib import Path

import gradio as gr

from localchat.chat.service import ChatService
from localchat.chat.store import StoreError
from localchat.engine import RequestError
from localchat.engine.panel import block_tokens, cached_prefix_tokens, panel_snapshot
from localchat.ui.compare import compare_html
from localchat.ui.layout import Widgets
from localchat.ui.memory_panel import panel_data, render_memory_html
from localchat.ui.overview import overview_html
from localchat.ui.presets import BUILTIN, PresetError, Presets
from localchat.ui.render import SETTING_NAMES, conversation_choices, params_from_settings
from localchat.ui.thread import Tree, conversation_html

log = logging.getLogger(__name__)

EXPECTED_ERRORS = (ValueError, StoreError, RequestError, RuntimeError)


def user_error(exc: BaseException) -> gr.Error:
    """A clear message for the browser (never a stack trace); the trace goes to the log."""
    log.info("request failed: %s", exc)
    return err(str(exc) or exc.__class__.__name__)


def err(message: str) -> gr.Error:
    return gr.Error(message, title="localchat", duration=6, print_exception=False)


def _int_or_none(value) -> int | None:
    try:
        return None if value in (None, "") else int(value)
    except (TypeError, ValueError):
        return None


class Handlers:
    def __init__(self, service: ChatService, presets: Presets | None = None) -> None:
        self.service = service
        self.store = service.store
        self.presets = presets or Presets()
        self.w: Widgets | None = None  # set by localchat/ui/app.py once the widgets exist
        self._export_dir = Path(tempfile.mkdtemp(prefix="localchat-export-"))

    def session_of(self, request: gr.Request | None) -> str:
        return getattr(request, "session_hash", None) or ""

    def read_params(self, settings_values):
        try:
            return params_from_settings(settings_values)
        except ValueError as exc:
            raise user_error(exc) from None

    @property
    def driver(self):
        """The engine client now (the model picker can switch engines under the page)."""
        return self.service.driver

    @property
    def info(self):
        """The engine's info now (the model picker can switch models under the page)."""
        return self.service.info

    # ------------------------------------------------------------ views
    @property
    def remote(self) -> bool:
        """The engine runs on another server: its block tables are not reachable (localchat/api/remote.py)."""
        return bool((getattr(self.info, "details", None) or {}).get("remote_url"))

    def memory_html(self) -> str:
        try:
            if self.remote:
                from localchat.ui.remote_panel import render_remote_html

                return render_remote_html(self.driver.snapshot(), title=f"KV cache · {self.info.model_name}")
            snap = self.driver.call(panel_snapshot)
            return render_memory_html(snap, title=f"KV cache · {self.info.model_name}", labels=self.owner_labels(),
                                      block_bytes=snap.block_bytes)
        except Exception as exc:  # noqa: BLE001 - the panel must never break the page
            log.exception("memory snapshot failed")
            return render_memory_html(None) + f"<!-- {type(exc).__name__} -->"

    def owner_labels(self) -> dict:
        """request id -> (owner key, label) for the replies being generated now, all tabs together."""
        labels = {}
        for rid, live in list(self.service.live.items()):
            try:
                title = self.store.get_conversation(live.conversation_id).title or f"Chat {live.conversation_id}"
                turn = len(self.store.path(live.parent_id)) + 1
            except StoreError:
                continue
            title = title if len(title) <= 24 else title[:23] + "…"
            labels[rid] = (rid, f"«{title}» · message {turn}")
        return labels

    def sidebar(self, conv_id, query: str = ""):
        try:
            found = (self.store.search_conversations(query.strip(), limit=200) if isinstance(query, str) and query.strip()
                     else self.store.list_conversations(limit=200))
        except StoreError as exc:
            raise user_error(exc) from None
        choices = conversation_choices(found)
        value = str(conv_id) if conv_id is not None and any(v == str(conv_id) for _, v in choices) else None
        return gr.Radio(choices=choices, value=value)

    def messages(self, conv_id):
        try:
            conv = self.store.get_conversation(conv_id)
            return conv, self.store.list_messages(conv_id)
        except StoreError:  # deleted meanwhile (another tab): show an empty chat
            return None, []

    def cached_tokens(self, id_lists):
        if self.remote:
            return None
        try:
            return self.driver.call(cached_prefix_tokens, id_lists)
        except Exception:  # noqa: BLE001 - the marks are a hint; the engine may be busy or gone
            log.exception("prefix cache query failed")
            return [0] * len(id_lists)

    def views(self, conv_id, leaf: int | None | str = "current", compare_of: int | None = None) -> dict:
        """The conversation showing the branch that ends at `leaf` ("current": the conversation's own;
        None: no message), its overview and, if asked, the comparison of a message's siblings."""
        w = self.w
        conv, messages = self.messages(conv_id) if conv_id is not None else (None, [])
        if conv is None:
            conv_id, messages = None, []
        if leaf == "current":
            leaf = conv.current_leaf_id if conv else None
        tok = self.info.tokenizer
        count = (lambda text: len(tok.encode(text, add_special_tokens=False))) if tok is not None else None
        out = {
            w.chat: conversation_html(conv_id, messages, leaf, context=self.info.max_model_len, count_tokens=count),
            w.overview: overview_html(conv_id, messages, leaf, cached=None if self.remote else self.cached_tokens,
                                      block_size=max(1, self.info.block_size)),
        }
        if compare_of is not None:
            out[w.compare] = compare_html(messages, compare_of, Tree.of(messages).path(leaf))
        return out

    def select(self, conv_id, query: str = "") -> dict:
        """Everything that changes when the page shows another conversation (or none)."""
        w = self.w
        conv = None
        if conv_id is not None:
            try:
                conv = self.store.get_conversation(conv_id)
            except StoreError:
                conv_id = None
        return {
            **self.views(conv_id),
            w.conv_state: conv_id,
            w.conv_list: self.sidebar(conv_id, query),
            w.title_box: conv.title if conv else "",
            w.system_box: (conv.system_prompt or "") if conv else gr.skip(),
            w.live: "",
            w.compare: "",
            w.status: "",
            w.export_file: gr.File(value=None, visible=False),
        }

    # ------------------------------------------------------------ conversations
    def on_load(self, request: gr.Request):
        wanted = _int_or_none(getattr(request, "query_params", {}).get("c")) if request is not None else None
        if wanted is None:
            newest = self.store.list_conversations(limit=1)
            wanted = newest[0].id if newest else None
        out = self.select(wanted)
        out[self.w.mem_html] = self.memory_html()
        out[self.w.preset] = gr.Dropdown(choices=self.presets.names())
        return out

    def on_pick(self, value, query):
        return self.select(_int_or_none(value), query)

    def on_new(self, query):
        return self.select(None, query)

    def on_search(self, query, conv_id):
        return {self.w.conv_list: self.sidebar(conv_id, query)}

    def on_rename(self, conv_id, new_title, query):
        if conv_id is None:
            raise err("Start or pick a conversation first.")
        if not isinstance(new_title, str) or not new_title.strip():
            raise err("The title is empty: write a title first.")
        try:
            self.store.rename_conversation(conv_id, new_title.strip())
        except EXPECTED_ERRORS as exc:
            raise user_error(exc) from None
        gr.Info("Renamed.")
        return {self.w.conv_list: self.sidebar(conv_id, query)}

    def on_delete(self, conv_id, query):
        if conv_id is None:
            raise err("There is no conversation selected to delete.")
        try:
            self.store.delete_conversation(conv_id)
        except EXPECTED_ERRORS as exc:
            raise user_error(exc) from None
        rest = self.store.list_conversations(limit=1)
        return self.select(rest[0].id if rest else None, query)

    def on_system(self, conv_id, text):
        """The system prompt belongs to the conversation: it applies from its first message (edit
        that message to start a branch with the new prompt)."""
        if conv_id is None or not isinstance(text, str):
            return {}
        try:
            conv = self.store.get_conversation(conv_id)
            if (conv.system_prompt or "") != text:
                self.store.update_conversation(conv_id, system_prompt=text.strip() or None)
        except EXPECTED_ERRORS as exc:
            raise user_error(exc) from None
        return {}

    # ------------------------------------------------------------ export and import
    def on_export(self, conv_id, fmt: str):
        if conv_id is None:
            raise err("Pick a conversation to export first.")
        try:
            conv = self.store.get_conversation(conv_id)
            text = self.store.export_json(conv_id) if fmt == "json" else self.store.export_markdown(conv_id)
        except EXPECTED_ERRORS as exc:
            raise user_error(exc) from None
        stem = re.sub(r"[^\w\- ]+", "", conv.title or "").strip().replace(" ", "-")[:40] or f"chat-{conv_id}"
        folder = Path(tempfile.mkdtemp(dir=self._export_dir))
        path = folder / f"{stem}.{'json' if fmt == 'json' else 'md'}"
        path.write_text(text, encoding="utf-8")
        return {self.w.export_file: gr.File(value=str(path), visible=True)}

    def on_import(self, file, query):
        path = getattr(file, "name", file)
        if not path:
            raise err("Choose a JSON file exported by localchat.")
        try:
            data = Path(path).read_bytes()
            if len(data) > 64 * 2**20:
                raise ValueError("the file is larger than 64 MiB")
            conv = self.store.import_json(data)
        except (OSError, *EXPECTED_ERRORS) as exc:
            raise user_error(exc) from None
        gr.Info(f"Imported “{conv.title or 'Untitled'}”.")
        return self.select(conv.id, query)

    # ------------------------------------------------------------ comparisons
    def on_compare(self, evt: gr.EventData, conv_id):
        message_id = _int_or_none((getattr(evt, "_data", None) or {}).get("message_id"))
        if conv_id is None or message_id is None:
            return {}
        conv, messages = self.messages(conv_id)
        if conv is None or message_id not in {m.id for m in messages}:
            raise err("That message is not in this conversation any more.")
        leaf = _int_or_none((getattr(evt, "_data", None) or {}).get("leaf")) or conv.current_leaf_id
        return {self.w.compare: compare_html(messages, message_id, Tree.of(messages).path(leaf))}

    # ------------------------------------------------------------ presets
    def on_preset(self, name):
        if not name:
            return {}
        try:
            values = self.presets.get(name)
        except PresetError as exc:
            raise user_error(exc) from None
        w = self.w
        out = {widget: values[field] for widget, field in zip(w.settings, SETTING_NAMES)}
        out[w.system_box] = values.get("system_prompt", "")
        out[w.preset_name] = "" if name in BUILTIN else name
        return out

    def on_preset_save(self, name, system, *values):
        try:
            params_from_settings(values)  # a preset that could not run is refused now, not later
            self.presets.save(name, {"system_prompt": system or "", **dict(zip(SETTING_NAMES, values))})
        except (PresetError, ValueError) as exc:
            raise user_error(exc) from None
        gr.Info(f"Saved the preset “{name.strip()}”.")
        return {self.w.preset: gr.Dropdown(choices=self.presets.names(), value=name.strip())}

    def on_preset_delete(self, name):
        try:
            self.presets.delete(name)
        except PresetError as exc:
            raise user_error(exc) from None
        return {self.w.preset: gr.Dropdown(choices=self.presets.names(), value=None)}

    # ------------------------------------------------------------ the page script's calls
    def server_switch_branch(self, arg) -> dict:
        """The page showed another branch: make it current, so the next message continues there."""
        arg = arg if isinstance(arg, dict) else {}
        conv_id, leaf = _int_or_none(arg.get("conv")), _int_or_none(arg.get("leaf"))
        if conv_id is None or leaf is None:
            return {"error": "conv and leaf must be message ids"}
        try:
            if self.store.get_message(leaf).conversation_id != conv_id:
                return {"error": "that message belongs to another conversation"}
            self.store.switch_branch(leaf)
        except StoreError as exc:
            return {"error": str(exc)}
        return {"ok": True, "leaf": leaf}

    def server_memory(self, arg) -> dict:
        """The memory panel's poll: the pool now and the timeline since the last poll."""
        since = arg.get("since") if isinstance(arg, dict) else None
        since = float(since) if isinstance(since, (int, float)) else None
        if self.remote:
            return {"error": "the engine runs on a remote server: refresh the panel for its /metrics"}
        try:
            snap = self.driver.call(panel_snapshot, since)
        except Exception as exc:  # noqa: BLE001 - the panel must never break the page
            return {"error": f"{type(exc).__name__}: {exc}"}
        return panel_data(snap, title=f"KV cache · {self.info.model_name}", labels=self.owner_labels(),
                          block_bytes=snap.block_bytes, since=since)

    def server_block_text(self, arg) -> dict:
        """The text a block's tokens spell (hovering a block in the panel)."""
        block = _int_or_none(arg.get("block")) if isinstance(arg, dict) else None
        if block is None:
            return {"error": "block must be a block id"}
        if self.remote or self.info.tokenizer is None:
            return {"error": "block contents are not reachable on a remote engine"}
        try:
            ids = self.driver.call(block_tokens, [block]).get(block, [])
        except Exception as exc:  # noqa: BLE001
            return {"error": f"{type(exc).__name__}: {exc}"}
        return {"block": block, "tokens": len(ids), "text": self.info.tokenizer.decode(ids, skip_special_tokens=False)}
