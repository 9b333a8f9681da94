"""Shared test fixtures."""

import pytest

from lit_align.tiny import build_tiny_tokenizer


@pytest.fixture
def tokenizer():
    """The built-in byte-level tokenizer with a chat template (no download)."""
    return build_tiny_tokenizer()


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Keep every test's tokenized cache in its own temporary folder, never ~/.cache."""
    monkeypatch.setenv("LIT_ALIGN_CACHE", str(tmp_path / "lit-align-cache"))
