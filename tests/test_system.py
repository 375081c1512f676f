"""common.system's page settings: read from the kernel's own file, and advice given only where
it changes something."""

from __future__ import annotations

import platform

import pytest

from common.system import HUGE_PAGE_MALLOC, huge_page_advice, transparent_hugepage_mode


@pytest.mark.parametrize("text, mode", [("always [madvise] never\n", "madvise"), ("[always] madvise never\n", "always"),
                                        ("always madvise [never]\n", "never"), ("", None)])
def test_the_transparent_huge_page_mode_is_the_bracketed_word(text, mode, tmp_path):
    setting = tmp_path / "enabled"
    setting.write_text(text)
    assert transparent_hugepage_mode(setting) == mode


def test_a_kernel_without_the_setting_has_no_mode(tmp_path):
    assert transparent_hugepage_mode(tmp_path / "absent") is None


@pytest.mark.parametrize("mode, tunables, libc, advised", [
    ("madvise", None, ("glibc", "2.36"), True),
    ("madvise", "glibc.malloc.arena_max=2", ("glibc", "2.35"), True),
    ("madvise", f"glibc.malloc.arena_max=2:{HUGE_PAGE_MALLOC}", ("glibc", "2.36"), False),  # already asked
    ("always", None, ("glibc", "2.36"), False),  # every large block gets huge pages already
    ("never", None, ("glibc", "2.36"), False),  # the tunable cannot help
    (None, None, ("", ""), False),  # macOS, Windows
    ("madvise", None, ("glibc", "2.31"), False),  # a glibc without the tunable
    ("madvise", None, ("musl", "1.2"), False),
])
def test_huge_page_advice_only_where_it_changes_something(mode, tunables, libc, advised, monkeypatch):
    monkeypatch.setattr(platform, "libc_ver", lambda: libc)
    advice = huge_page_advice({"transparent_hugepages": mode, "glibc_tunables": tunables})
    wanted = ":".join(setting for setting in (tunables, HUGE_PAGE_MALLOC) if setting)  # kept, and added to
    assert advice == (f"GLIBC_TUNABLES={wanted}" if advised else None)
