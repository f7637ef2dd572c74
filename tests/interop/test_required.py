"""A missing outside reference skips the interop tests on a developer's checkout and fails them
where they are required (CI)."""
import pytest

from tests.interop.required import REQUIRE_VARIABLE, reference, required

ABSENT = "manual_grad_no_such_reference_module"


@pytest.mark.parametrize("env,expected", [
    ({}, False), ({"CI": "true"}, True), ({"CI": "false"}, False), ({REQUIRE_VARIABLE: "1"}, True),
    ({REQUIRE_VARIABLE: "0", "CI": "true"}, False)])
def test_required_follows_the_environment(monkeypatch, env, expected):
    for name in ("CI", REQUIRE_VARIABLE):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert required() is expected


def test_missing_reference_skips_or_fails(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setenv(REQUIRE_VARIABLE, "0")
    with pytest.raises(pytest.skip.Exception):
        reference(ABSENT)
    monkeypatch.setenv(REQUIRE_VARIABLE, "1")
    with pytest.raises(ImportError, match=REQUIRE_VARIABLE):
        reference(ABSENT)
    assert reference("json").dumps([1]) == "[1]"
