"""anybn._env.EnvSetting reads what ``os.environ.get`` reads, at each call, however set."""

from __future__ import annotations

import os
from unittest import mock

import pytest

from anybn._env import EnvSetting
from anybn._fast import fast_paths_enabled

NAME = "ANYBN_TEST_ENV_SETTING"


def _spy() -> tuple[EnvSetting[str | None], list[str | None]]:
    """A setting that returns the text it parses and records each parse."""
    parsed: list[str | None] = []

    def parse(text: str | None) -> str | None:
        parsed.append(text)
        return text

    return EnvSetting(NAME, parse), parsed


def test_reads_what_os_environ_holds_at_each_call(monkeypatch):
    setting, _ = _spy()
    monkeypatch.delenv(NAME, raising=False)
    assert setting() is None
    monkeypatch.setenv(NAME, "3")
    assert setting() == "3"
    os.environ[NAME] = " 4 "
    assert setting() == " 4 "
    with mock.patch.dict(os.environ, {NAME: "5"}):
        assert setting() == "5"
    assert setting() == " 4 "
    del os.environ[NAME]
    assert setting() is None


def test_each_distinct_value_is_parsed_once(monkeypatch):
    setting, parsed = _spy()
    monkeypatch.setenv(NAME, "a")
    for _ in range(3):
        assert setting() == "a"
    monkeypatch.delenv(NAME)
    assert setting() is None and setting() is None
    monkeypatch.setenv(NAME, "a")
    assert setting() == "a"
    assert parsed == ["a", None]


def test_keeps_at_most_sixteen_values_and_still_reads_the_rest(monkeypatch):
    setting, parsed = _spy()
    for i in range(40):
        monkeypatch.setenv(NAME, str(i))
        assert setting() == str(i)
    assert len(setting._seen) == 16 and len(parsed) == 40


def test_a_refused_value_is_refused_at_every_call(monkeypatch):
    calls = []

    def parse(text: str | None) -> int:
        calls.append(text)
        return int(text or "1")

    setting = EnvSetting(NAME, parse)
    monkeypatch.setenv(NAME, "two")
    for _ in range(2):
        with pytest.raises(ValueError):
            setting()
    monkeypatch.setenv(NAME, "2")
    assert setting() == 2
    assert calls == ["two", "two", "2"]


def test_non_ascii_values_decode_as_os_environ_decodes_them(monkeypatch):
    setting, _ = _spy()
    monkeypatch.setenv(NAME, "d\u00e9j\u00e0")
    assert setting() == os.environ[NAME] == "d\u00e9j\u00e0"


def test_a_dict_that_disagrees_with_os_environ_is_no_longer_read(monkeypatch):
    """As if a Python kept os.environ's dict otherwise (another key encoding): the first
    disagreement, checked when a value is parsed, sends the setting to os.environ.get."""
    setting, parsed = _spy()
    monkeypatch.setenv(NAME, "7")
    monkeypatch.setattr(setting, "_key", b"NOT_" + NAME.encode())  # finds nothing in the dict
    assert setting() == "7" and setting._key is None
    monkeypatch.delenv(NAME)
    assert setting() is None
    assert parsed == ["7", None]


def test_a_replaced_os_environ_is_read_through_its_get(monkeypatch):
    setting, _ = _spy()
    monkeypatch.setenv(NAME, "from the real environment")
    monkeypatch.setattr(os, "environ", {NAME: "from a plain dict"})
    assert setting() == "from a plain dict"
    monkeypatch.setattr(os, "environ", {})
    assert setting() is None


@pytest.mark.parametrize(("value", "enabled"), [(None, True), ("1", True), ("0", False), (" Off ", False),
                                                ("no", False), ("FALSE", False), ("yes", True)])
def test_fast_paths_enabled_follows_the_variable(monkeypatch, value, enabled):
    if value is None:
        monkeypatch.delenv("ANYBN_FAST_PATHS", raising=False)
    else:
        monkeypatch.setenv("ANYBN_FAST_PATHS", value)
    assert fast_paths_enabled() is enabled


def test_the_cpu_paths_settings_follow_their_variables(monkeypatch):
    cpu = pytest.importorskip("anybn._fast.cpu")  # imports numpy only; numba loads on first use
    monkeypatch.delenv("ANYBN_NUM_THREADS", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert cpu._num_threads(lambda: 7) == 7 and not cpu._passive_workers()
    monkeypatch.setenv("ANYBN_NUM_THREADS", " 3 ")
    monkeypatch.setenv("OMP_WAIT_POLICY", "passive")
    assert cpu._num_threads(lambda: 7) == 3 and cpu._passive_workers()
    monkeypatch.setenv("ANYBN_NUM_THREADS", "0")
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert cpu._num_threads(lambda: 7) == 1 and not cpu._passive_workers()
    monkeypatch.setenv("ANYBN_NUM_THREADS", "")
    assert cpu._num_threads(lambda: 7) == 7
    monkeypatch.setenv("ANYBN_NUM_THREADS", "many")
    with pytest.raises(ValueError, match="ANYBN_NUM_THREADS must be a positive integer, got 'many'"):
        cpu._num_threads(lambda: 7)
