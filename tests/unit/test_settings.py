"""The proxy's one settings object: its flags, defaults and env come from ProxySettings."""

from __future__ import annotations

import typing

import pytest

from kubepeer.cli import build_parser
from kubepeer.proxy.server import SERVERS
from kubepeer.proxy.settings import ProxySettings

REQUIRED = ["--public-url", "https://o.example:8935", "--namespace", "ns"]


def settings(*argv: str) -> ProxySettings:
    args = build_parser().parse_args(["proxy", *argv])
    return args.settings(args)


def test_every_setting_is_a_flag_with_its_default(monkeypatch):
    monkeypatch.setenv("KUBEPEER_REDIS_URL", "redis://from-env:6379")
    got = settings(*REQUIRED)
    for name, field in ProxySettings.model_fields.items():
        if not field.is_required():
            assert getattr(got, name) == field.default, name
    assert got.redis_url == "redis://from-env:6379"  # a Secret's URL, through the env


def test_flags_win_over_the_env_and_booleans_take_no(monkeypatch):
    monkeypatch.setenv("KUBEPEER_REDIS_URL", "redis://from-env:6379")
    monkeypatch.setenv("KUBEPEER_MAX_QUEUE", "3")
    assert settings(*REQUIRED).max_queue == 3
    got = settings(*REQUIRED, "--max-queue", "5", "--no-payments", "--no-wake",
                   "--redis-url", "redis://flag:6379")  # fmt: skip
    assert (got.max_queue, got.payments, got.wake, got.redis_url) == (
        5, False, False, "redis://flag:6379"
    )  # fmt: skip


def test_a_bad_or_missing_setting_stops_the_command_naming_the_flag(monkeypatch, capsys):
    monkeypatch.delenv("KUBEPEER_REDIS_URL", raising=False)
    with pytest.raises(SystemExit):
        settings("--max-queue", "-1")
    error = capsys.readouterr().err
    assert "--public-url: Field required" in error
    assert "--redis-url: Field required" in error
    assert "--max-queue: Input should be greater than or equal to 0 (got -1)" in error


def test_the_server_choices_are_the_servers_the_proxy_runs_on():
    assert typing.get_args(ProxySettings.model_fields["server"].annotation) == SERVERS


def test_the_payments_settings_come_from_flags_and_env_and_never_take_the_rpc_url(
    monkeypatch, capsys
):
    from kubepeer.payments.redeemer import RedeemerSettings

    monkeypatch.setenv("KUBEPEER_REDIS_URL", "redis://from-env:6379")
    args = build_parser().parse_args(
        ["payments", "--keystore", "k.json", "--password-file", "p", "--network", "dev",
         "--reward", "--metrics-port", "9102"]
    )  # fmt: skip
    got = args.settings(args)
    assert (got.network, got.reward, got.metrics_port, got.redis_url) == (
        "dev", True, 9102, "redis://from-env:6379"
    )  # fmt: skip
    assert got.max_fee_per_gas == RedeemerSettings.max_fee_per_gas  # one default, the redeemer's
    with pytest.raises(SystemExit):  # an API key in a flag would show in `ps` and logs
        build_parser().parse_args(["payments", "--rpc-url", "https://arb1.example/KEY"])
    assert "unrecognized arguments: --rpc-url" in capsys.readouterr().err
