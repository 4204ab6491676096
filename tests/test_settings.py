"""Settings: a hand-edited settings.json never stops the app, and keys from newer versions survive a save."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from repomem.core import settings as settings_mod


def test_bad_values_fall_back_to_defaults_and_good_ones_stay(home: Path, caplog: pytest.LogCaptureFixture) -> None:
    d = settings_mod.Settings()
    raw = {"boost_top": -1, "top_k": "5", "n_ctx": True, "placement": "diagonal", "key_scale": 1,
           "mode": "text", "private_paths": ["secret/", 3], "repos": "not a list", "memory_tokens": 1500,
           "from_a_newer_version": {"x": 1}}
    settings_mod.settings_path().write_text(json.dumps(raw))
    with caplog.at_level(logging.WARNING, logger="repomem.core.settings"):
        s = settings_mod.load()
    assert (s.boost_top, s.top_k, s.n_ctx, s.placement) == (d.boost_top, d.top_k, d.n_ctx, d.placement)
    assert (s.private_paths, s.repos) == (d.private_paths, d.repos)
    assert (s.key_scale, s.mode, s.memory_tokens) == (1, "text", 1500)
    assert sum("using" in r.getMessage() for r in caplog.records) == 6

    settings_mod.save(s)
    kept = json.loads(settings_mod.settings_path().read_text())
    assert kept["from_a_newer_version"] == {"x": 1} and kept["boost_top"] == d.boost_top


def test_unreadable_file_gives_defaults(home: Path) -> None:
    settings_mod.settings_path().write_text("{not json")
    assert settings_mod.load() == settings_mod.Settings()
