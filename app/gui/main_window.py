"""The main window: repositories and conversations on the left, chat and memory inspector on the right.

Why it is mostly wiring: the work happens in core (on the memory worker and short-lived threads);
`RepoController` keeps memories current, `ChatController` runs the conversation, `Inspector` shows
the cubes. The window adds what is the user's: settings (saved with core.settings), opening sources
in an editor, the tray and close-to-tray, and error notifications.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QAction, QCloseEvent, QKeySequence
from PySide6.QtWidgets import (
    QApplication,
    QLabel,
    QMainWindow,
    QSplitter,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from . import memory_ops as ops
from .chat_controller import ChatController
from .chat_pane import ChatPane
from .connect_panel import ConnectPanel
from .conversation_list import ConversationList
from .editor import open_location
from .icons import app_icon
from .inspector import Inspector
from .jobs import wait_all_detached
from .memory_worker import MemoryWorker
from .repo_controller import RepoController
from .repo_sidebar import RepoSidebar
from .settings_dialog import SettingsDialog
from .tray import Tray


class MainWindow(QMainWindow):
    """`settings` defaults to core's load_settings(); `watch=False` keeps watchers out (tests, scripted runs)."""

    error_shown = Signal(str)

    def __init__(self, settings: Any = None, *, watch: bool = True, restore_repos: bool = True,
                 persist: bool = True, tray: bool = True) -> None:
        super().__init__()
        from repomem.core import load_settings

        self.settings = settings if settings is not None else load_settings()
        self.persist = persist
        self.quitting = False
        self.errors: list[str] = []
        self.setWindowTitle("repomem")
        self.setWindowIcon(app_icon())
        self.resize(1200, 780)

        self.worker = MemoryWorker(self.settings)
        self.worker.start()
        self.stores = ops.StoreAccess()

        self.sidebar = RepoSidebar()
        self.conversations = ConversationList()
        self.chat = ChatPane()
        self.chat.set_mode(self.settings.mode)
        self.inspector = Inspector(self.worker, self.stores)
        self.connect_panel = ConnectPanel(lambda: self.settings, lambda: list(self.sidebar.states), watch=watch)
        self.tabs = QTabWidget()
        self.tabs.addTab(self.chat, "Chat")
        self.tabs.addTab(self.inspector, "Memory")
        self.tabs.addTab(self.connect_panel, "Connect an editor")
        self.tabs.currentChanged.connect(self._tab_changed)

        left = QSplitter(Qt.Orientation.Vertical)
        left.addWidget(self.sidebar)
        left.addWidget(self.conversations)
        left.setStretchFactor(0, 1)
        left.setStretchFactor(1, 1)
        split = QSplitter(Qt.Orientation.Horizontal)
        split.addWidget(left)
        split.addWidget(self.tabs)
        split.setStretchFactor(0, 0)
        split.setStretchFactor(1, 1)
        split.setSizes([300, 900])
        central = QWidget()
        layout = QVBoxLayout(central)
        layout.setContentsMargins(6, 6, 6, 6)
        layout.addWidget(split)
        self.setCentralWidget(central)

        self.model_label = QLabel()
        self.model_label.setStyleSheet("color: #6e7781")
        self.statusBar().addPermanentWidget(self.model_label)
        self._show_model()

        self.repos = RepoController(self.worker, self.stores, self.sidebar, watch=watch, parent=self)
        self.chat_ctl = ChatController(self.worker, self.stores, self.chat, self.conversations, parent=self,
                                       open_roots=self.sidebar.roots)
        self.repos.error.connect(self.notify_error)
        self.repos.stats_changed.connect(self._stats_changed)
        self.chat_ctl.error.connect(self.notify_error)
        # an answer touches cubes (use counts) and adds a conversation cube: show it
        self.chat_ctl.answer_finished.connect(lambda _a: self.repos.refresh_stats(self.current_root(), force=True))
        self.inspector.error.connect(self.notify_error)
        self.connect_panel.error.connect(self.notify_error)
        self.connect_panel.copied.connect(lambda client: self.statusBar().showMessage(f"{client} configuration copied",
                                                                                      3000))
        self.inspector.changed.connect(lambda: self.repos.refresh_stats(self.current_root(), force=True))
        self.chat.view.open_source.connect(self.open_source)
        self.chat.view.copied.connect(lambda _code: self.statusBar().showMessage("Code copied", 2000))
        self.sidebar.add_requested.connect(self._add_from_picker)
        self.sidebar.remove_requested.connect(self.remove_repository)
        self.sidebar.current_changed.connect(self._repo_selected)

        self.tray = Tray(app_icon(), self) if tray else None
        if self.tray is not None:
            self.tray.show_requested.connect(self.show_and_raise)
            self.tray.quit_requested.connect(self.quit)
        self._build_menu()

        if restore_repos:
            for root in list(self.settings.repos):
                if Path(root).is_dir():
                    self.add_repository(root, persist=False)

    # -- menu ----------------------------------------------------------------------------------
    def _build_menu(self) -> None:
        file_menu = self.menuBar().addMenu("&File")
        add = QAction("Add repository…", self)
        add.setShortcut(QKeySequence("Ctrl+O"))
        add.triggered.connect(self.sidebar._pick_folder)
        settings = QAction("Settings…", self)
        settings.setShortcut(QKeySequence("Ctrl+,"))
        settings.triggered.connect(self.open_settings)
        quit_ = QAction("Quit", self)
        quit_.setShortcut(QKeySequence("Ctrl+Q"))
        quit_.triggered.connect(self.quit)
        for a in (add, settings):
            file_menu.addAction(a)
        file_menu.addSeparator()
        file_menu.addAction(quit_)
        chat_menu = self.menuBar().addMenu("&Chat")
        new = QAction("New conversation", self)
        new.setShortcut(QKeySequence("Ctrl+N"))
        new.triggered.connect(self.chat_ctl.new_conversation)
        stop = QAction("Stop", self)
        stop.setShortcut(QKeySequence("Esc"))
        stop.triggered.connect(self.chat_ctl.stop)
        chat_menu.addAction(new)
        chat_menu.addAction(stop)

    # -- repositories --------------------------------------------------------------------------
    def add_repository(self, path: str | Path, *, persist: bool = True) -> str:
        """Show, index and watch a repository; remember it in the settings unless `persist` is False."""
        root = self.repos.add(path)
        if persist and self.persist and root not in self.settings.repos:
            self.settings.repos.append(root)
            self.save_settings(self.settings, reconfigure=False)
        self.sidebar.select(root)
        return root

    def remove_repository(self, root: str) -> None:
        self.repos.remove(root)
        if root in self.settings.repos:
            self.settings.repos.remove(root)
            if self.persist:
                self.save_settings(self.settings, reconfigure=False)

    def current_root(self) -> str:
        return self.sidebar.current_root()

    def _add_from_picker(self, folder: str) -> None:
        try:
            self.add_repository(folder)
        except OSError as exc:
            self.notify_error(str(exc))

    def _repo_selected(self, root: str) -> None:
        self.chat_ctl.set_root(root)
        self.setWindowTitle(f"repomem — {Path(root).name}" if root else "repomem")
        if self.tabs.currentWidget() is self.inspector or root == "":
            self.inspector.set_root(root)
        else:
            self.inspector.root = ""  # loaded when the tab is shown

    def _tab_changed(self, _index: int) -> None:
        if self.tabs.currentWidget() is self.inspector:
            self.inspector.set_root(self.current_root())

    def _stats_changed(self, root: str) -> None:
        if root == self.current_root() and self.tabs.currentWidget() is self.inspector and not self.inspector.loading:
            self.inspector.refresh()

    # -- chat helpers (also used by the scripted mode and tests) ----------------------------------
    def ask(self, question: str, mode: str = "", scope: str = "") -> Any:
        """`scope`: "repo" (this repository) or "all" (every open repository); "" keeps the pane's choice."""
        if mode:
            self.chat.set_mode(mode)
        if scope:
            self.chat.set_scope(scope)
        return self.chat_ctl.ask(question, mode)

    def open_source(self, rel_path: str, line: int) -> None:
        root = self.current_root()
        path = Path(root) / rel_path if root else Path(rel_path)
        if not path.exists():
            self.notify_error(f"{rel_path} no longer exists in {root}")
            return
        try:
            open_location(path, line, self.settings.editor_command)
        except (OSError, ValueError) as exc:
            self.notify_error(f"could not open the editor: {exc}")

    # -- settings ------------------------------------------------------------------------------
    def open_settings(self) -> None:
        dialog = SettingsDialog(self.settings, self)
        if dialog.exec():
            self.save_settings(dialog.result_settings())

    def save_settings(self, settings: Any, *, reconfigure: bool = True) -> None:
        """Persist (core's save_settings) and, when model-affecting values changed, reopen memories."""
        from repomem.core import save_settings

        self.settings = settings
        try:
            save_settings(settings)
        except OSError as exc:  # a full disk or an unwritable data folder: they still apply to this session
            self.notify_error(f"could not save the settings ({exc}); they apply until the app closes")
        self.chat.set_mode(settings.mode)
        if reconfigure:
            self.worker.reconfigure(settings)
            self._show_model()

    def _show_model(self) -> None:
        from .model_setup import model_problem

        problem = model_problem(self.settings.model)
        if problem:
            self.model_label.setText("no model — File › Settings")
            self.model_label.setToolTip(problem)
            return
        from repomem.core import resolve_model

        path = resolve_model(self.settings.model or None)
        self.model_label.setText(path.name)
        self.model_label.setToolTip(str(path))

    # -- errors, tray, closing -----------------------------------------------------------------
    def notify_error(self, message: str) -> None:
        """Errors only: status bar always, a tray notification when the window is hidden."""
        self.errors.append(message)
        self.statusBar().showMessage(f"⚠ {message}", 15000)
        if self.tray is not None and not self.isVisible():
            self.tray.error("repomem", message)
        self.error_shown.emit(message)

    def show_and_raise(self) -> None:
        self.show()
        self.raise_()
        self.activateWindow()

    def closeEvent(self, event: QCloseEvent) -> None:  # noqa: N802 - Qt override
        if (not self.quitting and self.settings.close_to_tray and self.tray is not None
                and self.tray.available):
            event.ignore()
            self.hide()
            self.tray.set_status("watching in the background")
            return
        self.shutdown()
        event.accept()

    def quit(self) -> None:
        self.quitting = True
        self.close()
        app = QApplication.instance()
        if app is not None:
            app.quit()

    def shutdown(self) -> None:
        """Cancel work, stop the worker (closing memories), close stores. Watchers keep running."""
        if getattr(self, "_shut", False):
            return
        self._shut = True
        self.chat_ctl.closed = self.inspector.closed = True
        self.connect_panel.shutdown()
        self.repos.shutdown()
        self.chat_ctl.stop()
        self.worker.stop(timeout_ms=15000)
        wait_all_detached()
        self.stores.close()
        if self.tray is not None:
            self.tray.hide()
