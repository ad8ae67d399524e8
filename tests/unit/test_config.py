from __future__ import annotations

import argparse

import pytest

from colo_agent.config import FailoverTimings, env_arg, parse_address, parse_quantity, read_secret


@pytest.mark.parametrize(
    ("text", "value"),
    [("64Mi", 64 << 20), ("1Gi", 1 << 30), ("512M", 512_000_000), ("4096", 4096), ("8Ki", 8192)],
)
def test_quantities(text: str, value: int) -> None:
    assert parse_quantity(text) == value


@pytest.mark.parametrize("text", ["", "64 MB", "-1Mi", "1.5Gi", "Mi"])
def test_bad_quantities_say_what_is_expected(text: str) -> None:
    with pytest.raises(ValueError, match="memory size"):
        parse_quantity(text)


def test_addresses() -> None:
    assert parse_address("10.0.0.2:7700") == ("10.0.0.2", 7700)
    assert parse_address(":80") == ("127.0.0.1", 80)
    assert parse_address("[::1]:6379") == ("::1", 6379)
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_address("host")
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_address("host:99999")


def test_flag_wins_over_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLO_TEST_ROLE", "secondary")
    parser = argparse.ArgumentParser()
    env_arg(parser, "--role", "COLO_TEST_ROLE", required=True, help="role")
    assert parser.parse_args([]).role == "secondary"
    assert parser.parse_args(["--role", "primary"]).role == "primary"
    assert "COLO_TEST_ROLE" in parser.format_help()


def test_required_flag_without_environment_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COLO_TEST_ROLE", raising=False)
    parser = argparse.ArgumentParser()
    env_arg(parser, "--role", "COLO_TEST_ROLE", required=True)
    with pytest.raises(SystemExit):
        parser.parse_args([])


def test_secret(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    f = tmp_path / "key"
    f.write_text("0123456789abcdef0123\n")
    assert read_secret(str(f)) == b"0123456789abcdef0123"
    monkeypatch.setenv("COLO_SECRET", "short")
    with pytest.raises(ValueError, match="secret"):
        read_secret(None)


def test_timeout_must_exceed_interval() -> None:
    FailoverTimings(0.1, 0.5, 1.0)
    with pytest.raises(ValueError, match="heartbeat-timeout"):
        FailoverTimings(0.1, 0.1, 1.0)
