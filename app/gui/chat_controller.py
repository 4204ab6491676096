"""Runs the conversation: asks on the memory worker (this repository's memory, or all open ones at once),
streams tokens into the view, keeps history.

Why a controller: the pane and the list are plain widgets; this object owns the one answer in
flight (its job, its stop event) and the current conversation, and it is the only place that turns
core's `Answer` (sources, timings, mode) into what the transcript shows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from PySide6.QtCore import QObject, Signal

from . import memory_ops as ops
from .chat_pane import ChatPane
from .chat_view import ChatMessage, EvidenceRef, SourceRef
from .conversation_list import ConversationList
from .jobs import Job
from .memory_worker import MemoryWorker
from .records import pick


def answer_meta(answer: Any) -> str:
    """The discreet line under an answer: mode, memory used, time to first token, total time."""
    mode = str(pick(answer, "mode", default=""))
    parts = [{"kv": "KV memory", "text": "text memory", "none": "no memory"}.get(mode, mode)]
    spliced, as_text = int(pick(answer, "spliced", default=0)), int(pick(answer, "as_text", default=0))
    if spliced or as_text:
        parts.append(f"{spliced} spliced, {as_text} as text" if mode == "kv" else f"{as_text} as text")
    ttft = pick(answer, "ttft_s")
    if ttft is not None:
        parts.append(f"first token {float(ttft):.2f} s")
    total = pick(answer, "total_s")
    if total is not None:
        parts.append(f"{float(total):.1f} s total")
    stop = pick(answer, "stop_reason", default="")
    if stop == "cancelled":
        parts.append("stopped")
    elif stop in ("length", "context"):
        parts.append("cut at the length limit")
    return " · ".join(p for p in parts if p)


def evidence_ref(evidence: Any, sources: Sequence[Any] = (), refs: Sequence[SourceRef] = ()) -> EvidenceRef | None:
    """What the view shows of core's `Evidence` (or its dict); None for an answer without one. It opens in the
    repository of the source (core's, beside its citation in `refs`) whose lines it is."""
    if not evidence:
        return None
    ref = EvidenceRef.from_core(evidence)
    cube_id = pick(evidence, "cube_id", default="")
    repo = next((r.repo for s, r in zip(sources, refs, strict=False) if cube_id and pick(s, "cube_id") == cube_id), "")
    return replace(ref, repo=repo)


def source_refs(sources: Sequence[Any], root: str, *, across: bool = False) -> list[SourceRef]:
    """The citations under an answer. Those of an answer across repositories (`across`, or a stored answer
    citing another repository than `root`) name each source's repository."""
    repos = [str(pick(s, "repo", default="") or "") for s in sources]
    named = across or any(r and r != root for r in repos)
    return [replace(SourceRef.from_core(s), repo=r if named else "") for s, r in zip(sources, repos, strict=True)]


def recorded_message(record: Any, root: str = "") -> ChatMessage:
    """A message of a stored conversation of `root` as the transcript shows it (answers saved before
    evidence was recorded have none)."""
    role = str(pick(record, "role", default="assistant"))
    meta = pick(record, "meta", default={}) or {}
    meta = meta if isinstance(meta, dict) else {}
    sources = meta.get("sources", [])
    refs = source_refs(sources, root)
    return ChatMessage(role, str(pick(record, "content", default="")), refs,
                       answer_meta(meta) if role == "assistant" and meta else "", recorded=True,
                       evidence=evidence_ref(meta.get("evidence"), sources, refs))


class ChatController(QObject):
    answer_finished = Signal(object)  # core Answer
    answer_failed = Signal(str)
    conversations_changed = Signal()
    error = Signal(str)

    def __init__(self, worker: MemoryWorker, stores: ops.StoreAccess, pane: ChatPane,
                 conversations: ConversationList, parent: QObject | None = None, *,
                 open_roots: Callable[[], Sequence[str]] = lambda: ()) -> None:
        super().__init__(parent)
        self.worker, self.stores, self.pane, self.list = worker, stores, pane, conversations
        self.open_roots = open_roots  # every repository open in the app (the scope "All open repositories")
        self.root = ""
        self.conversation_id = ""
        self.job: Job | None = None
        self.closed = False  # set at shutdown: late job results must not touch deleted widgets
        pane.ask_requested.connect(self.ask)
        pane.stop_requested.connect(self.stop)
        pane.regenerate_requested.connect(self.regenerate)
        conversations.selected.connect(self.open_conversation)
        conversations.new_requested.connect(self.new_conversation)
        conversations.rename_requested.connect(self.rename_conversation)
        conversations.delete_requested.connect(self.delete_conversation)

    # -- repository / conversation ---------------------------------------------------------------
    def set_root(self, root: str) -> None:
        if root == self.root:
            return
        self.stop()
        self.root = root
        self.conversation_id = ""
        self.pane.view.set_messages([])
        self.pane.timing.setText("")
        self.pane.set_enabled_for_repo(bool(root))
        self.list.set_conversations([])
        if root:
            self.reload_conversations()

    def reload_conversations(self) -> Job | None:
        if not self.root:
            return None
        root = self.root
        job = self.stores.run_chat(root, ops.list_conversations, name="conversations")
        job.succeeded.connect(lambda convs, r=root: self._show_conversations(r, convs))
        job.failed.connect(self.error)
        return job

    def _show_conversations(self, root: str, conversations: list[Any]) -> None:
        if root == self.root and not self.closed:
            self.list.set_conversations(conversations, self.conversation_id)
            self.conversations_changed.emit()

    def open_conversation(self, conversation_id: str) -> Job | None:
        if self.pane.streaming or conversation_id == self.conversation_id:
            return None
        self.conversation_id = conversation_id
        if not conversation_id:
            self.pane.view.set_messages([])
            return None
        job = self.stores.run_chat(self.root, ops.conversation_messages(conversation_id), name="messages")
        job.succeeded.connect(lambda msgs, cid=conversation_id: self._show_messages(cid, msgs))
        job.failed.connect(self.error)
        return job

    def _show_messages(self, conversation_id: str, messages: list[Any]) -> None:
        if conversation_id != self.conversation_id or self.closed:
            return
        loaded = [recorded_message(m, self.root) for m in messages]
        if self.pane.streaming:  # asked while they loaded: the question and its streaming answer stay last
            self.pane.view.set_messages(loaded + self.pane.view.messages[-2:])
            return
        self.pane.view.set_messages(loaded)
        self.pane.set_streaming(False)

    def new_conversation(self) -> None:
        """A fresh, empty conversation; core creates it with the first question (titled after it)."""
        if self.pane.streaming:
            return
        self.conversation_id = ""
        self.list.clear_selection()
        self.pane.view.set_messages([])
        self.pane.timing.setText("")
        self.pane.set_streaming(False)
        self.pane.input.setFocus()

    def rename_conversation(self, conversation_id: str, title: str) -> Job:
        job = self.stores.run_chat(self.root, ops.rename_conversation(conversation_id, title), name="rename")
        job.succeeded.connect(lambda _r: self.reload_conversations())
        job.failed.connect(self.error)
        return job

    def delete_conversation(self, conversation_id: str) -> Job:
        if conversation_id == self.conversation_id:
            self.new_conversation()
        job = self.stores.run_chat(self.root, ops.delete_conversation(conversation_id), name="delete")
        job.succeeded.connect(lambda _r: self.reload_conversations())
        job.failed.connect(self.error)
        return job

    # -- asking ----------------------------------------------------------------------------------
    def ask(self, question: str, mode: str = "") -> Job | None:
        """Show the question, stream the answer, then its sources and timing."""
        if not self.root or self.pane.streaming or not question.strip():
            return None
        mode = mode or self.pane.current_mode()
        self.pane.view.add_message(ChatMessage("user", question))
        roots = self._scope()
        asker = ops.asker_across if roots else ops.asker
        return self._start(asker(question, mode, self.conversation_id), mode, roots)

    def regenerate(self, mode: str = "") -> Job | None:
        """Ask the last question again; its previous answer is replaced (in the view and in history)."""
        view = self.pane.view
        if not self.root or self.pane.streaming:
            return None
        last_user = max((i for i, m in enumerate(view.messages) if m.role == "user"), default=-1)
        if last_user < 0:
            return None
        question = view.messages[last_user].text
        recorded = any(m.recorded for m in view.messages[last_user:])
        while view.messages and view.messages[-1].role != "user":
            view.remove_last()
        mode = mode or self.pane.current_mode()
        # Only a recorded exchange is dropped from history: after a stopped or failed answer the
        # last recorded exchange is an older one, which must stay.
        conv = self.conversation_id if recorded else ""
        roots = self._scope()
        return self._start(ops.regenerate(question, mode, conv, self.conversation_id, across=bool(roots)), mode,
                           roots)

    def stop(self) -> None:
        if self.job is not None:
            self.job.cancel.set()

    def _scope(self) -> list[str]:
        """The repositories to ask across, this one first (its conversation holds the exchange); [] to ask
        this repository alone."""
        if self.pane.current_scope() != "all":
            return []
        return [self.root, *(r for r in self.open_roots() if r != self.root)]

    def _start(self, fn: Any, mode: str, across: list[str]) -> Job:
        self.pane.view.add_message(ChatMessage("assistant", streaming=True, meta=f"{mode} · thinking…"))
        self.pane.set_streaming(True)
        self.pane.timing.setText("")
        if across:
            job = self.worker.call_across(across, fn, name="ask")
        else:
            job = self.worker.call(self.root, fn, name="ask")
        self.job = job
        root = self.root
        job.text.connect(self._on_text)
        job.succeeded.connect(lambda ans, r=root, named=bool(across): self._on_answer(r, ans, across=named))
        job.failed.connect(lambda msg, r=root: self._on_failed(r, msg))
        job.cancelled.connect(lambda r=root: self._on_cancelled(r))
        return job

    def _on_text(self, piece: str) -> None:
        if self.closed:
            return
        view = self.pane.view
        if view.messages and view.messages[-1].streaming:
            if not view.messages[-1].text:
                view.update_last(meta="")
            view.append_text(piece)

    def _finish(self) -> bool:
        """End of the answer in flight; False when the window is gone (nothing to update)."""
        self.job = None
        if self.closed:
            return False
        self.pane.set_streaming(False)
        return True

    def _on_answer(self, root: str, answer: Any, *, across: bool = False) -> None:
        if not self._finish() or root != self.root:
            return
        text = str(pick(answer, "answer", default="")) or self.pane.view.messages[-1].text
        core_sources = pick(answer, "sources", default=[])
        sources = source_refs(core_sources, root, across=across)
        warnings = pick(answer, "warnings", default=[]) or []
        meta = "\n".join([answer_meta(answer), *map(str, warnings)])
        recorded = pick(answer, "stop_reason", default="") != "cancelled"
        self.pane.view.update_last(text=text, sources=sources, meta=meta, streaming=False, recorded=recorded,
                                   evidence=evidence_ref(pick(answer, "evidence"), core_sources, sources))
        ttft = pick(answer, "ttft_s")
        self.pane.timing.setText(f"first token {float(ttft):.2f} s" if ttft is not None else "")
        new_id = str(pick(answer, "conversation_id", default="") or "")
        if new_id and new_id != self.conversation_id:
            self.conversation_id = new_id
        self.reload_conversations()
        self.answer_finished.emit(answer)

    def _on_failed(self, root: str, message: str) -> None:
        if self._finish() and root == self.root:
            self.pane.view.update_last(role="error", text=message, streaming=False, meta="")
        self.answer_failed.emit(message)

    def _on_cancelled(self, root: str) -> None:
        if self._finish() and root == self.root:
            view = self.pane.view
            view.update_last(streaming=False, meta="stopped", text=view.messages[-1].text)
        self.answer_failed.emit("cancelled")
