"""Configuration: defaults, and errors that name the key and the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from postroom import config
from postroom.errors import ConfigError


def test_embedded_defaults_are_safe() -> None:
    cfg = config.load(None)
    assert cfg.relay.trusted_networks == []  # not even loopback may relay
    assert cfg.smtp.max_message_size == 10_240_000
    assert cfg.smtp.max_recipients == 1000
    assert cfg.smtp.max_received_headers == 100
    assert not cfg.smtp.reject_bare_lf
    listeners = {listener.role: listener for listener in cfg.listeners()}
    assert set(listeners) == {"mx", "submission", "submissions", "pop3", "pop3s"}
    ports = {role: listener.host_port()[1] for role, listener in listeners.items()}
    assert ports in ({"mx": 25, "submission": 587, "submissions": 465, "pop3": 110, "pop3s": 995},
                     {"mx": 2525, "submission": 2587, "submissions": 2465, "pop3": 2110,
                      "pop3s": 2995})
    assert not listeners["mx"].offers_auth and not listeners["mx"].requires_auth
    assert listeners["submission"].offers_auth and listeners["submission"].requires_auth
    assert listeners["submissions"].implicit_tls and not listeners["submission"].implicit_tls
    assert cfg.auth.mechanisms == ["SCRAM-SHA-256", "PLAIN", "LOGIN"]
    assert not cfg.auth.allow_plaintext_on_loopback
    assert cfg.hostname and "." not in cfg.hostname[-1:]


def test_a_login_listener_cannot_turn_auth_off(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text('[[listener]]\nrole = "submission"\naddress = "127.0.0.1:587"\nauth = false\n')
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert "a submission listener needs auth" in str(info.value)


def test_auth_limits_are_checked(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text("[auth]\nip_free_failures = 5\nip_max_failures = 5\n")
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert "ip_max_failures must be greater than ip_free_failures" in str(info.value)
    path.write_text('[auth]\nmechanisms = ["DIGEST-MD5"]\n')
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert "invalid value for 'auth.mechanisms[0]'" in str(info.value)


def test_unknown_key_is_named(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text("[smtp]\nmax_mesage_size = 5\n")
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert str(info.value) == f"{path}: unknown key 'smtp.max_mesage_size'"


def test_invalid_value_is_named(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text('[relay]\ntrusted_networks = ["10.0.0.0/33"]\n[[listener]]\naddress = "x"\n')
    with pytest.raises(ConfigError) as info:
        config.load(path)
    text = str(info.value)
    assert f"{path}: invalid value for 'relay.trusted_networks'" in text
    assert f"{path}: invalid value for 'listener[0].address'" in text


def test_bad_toml_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text("[smtp\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(path)
    with pytest.raises(ConfigError, match="no such file"):
        config.load(tmp_path / "absent.toml")


def test_listener_addresses() -> None:
    assert config.parse_hostport("[::1]:25") == ("::1", 25)
    assert config.parse_hostport("127.0.0.1:2525") == ("127.0.0.1", 2525)
    assert config.parse_hostport(":587") == ("0.0.0.0", 587)
    with pytest.raises(ValueError):
        config.parse_hostport("localhost")


def test_defaults_are_settled_at_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """A server started as root keeps root's defaults after it drops privileges."""
    monkeypatch.setattr(config, "running_as_root", lambda: True)
    cfg = config.load(None)
    monkeypatch.setattr(config, "running_as_root", lambda: False)
    assert cfg.data_dir == config.DEFAULT_DATA_DIR_ROOT
    assert cfg.listeners()[0].host_port() == ("0.0.0.0", 25)
    assert cfg.server.hostname == config.default_hostname()


def test_relative_data_dir_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "p.toml"
    path.write_text('[server]\ndata_dir = "spool-here"\n')
    assert config.load(path).data_dir == tmp_path / "spool-here"
