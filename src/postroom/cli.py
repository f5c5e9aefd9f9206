"""The ``postroom`` command: accounts, domains, aliases and configuration checks.

::

    postroom [-c FILE] domain add|list|remove ...
    postroom [-c FILE] user add|list|remove|passwd|quota|cram-md5 ...
    postroom [-c FILE] user sender add|list|remove ...
    postroom [-c FILE] alias add|list|remove ...
    postroom [-c FILE] check-config

The configuration file comes from ``-c/--config`` or ``$POSTROOM_CONFIG``; without either the
built-in defaults apply. Lists print as tables, or as JSON with ``--json``. A refused operation
prints one line on stderr and exits with status 1, without a traceback. Passwords are read from a
hidden prompt (typed twice) or, for scripts, one line of standard input (``--password-stdin``);
they are never echoed, logged or accepted on the command line.
"""

from __future__ import annotations

import json
import re
import sys
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from postroom import __version__
from postroom import config as config_mod
from postroom.accounts.credentials import PasswordCredentials, derive_credentials, seal_cram_secret
from postroom.accounts.passwords import verify_password
from postroom.accounts.secrets import ServerKey
from postroom.accounts.store import AccountStore, User, data_owner
from postroom.errors import ConfigError, PostroomError

_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``100M`` -> 104857600. Units K, M, G, T are powers of 1024 (``KiB``, ``MB`` ... also
    accepted); ``0``, ``none`` and ``unlimited`` mean no quota."""
    value = text.strip()
    if value.lower() in ("none", "unlimited"):
        return 0
    match = _SIZE.fullmatch(value)
    if match is None:
        raise ValueError(f"{text!r} is not a size (examples: 0, 500K, 100M, 2G)")
    try:
        number = Decimal(match.group(1))
    except InvalidOperation:  # pragma: no cover - the pattern only lets digits through
        raise ValueError(f"{text!r} is not a size") from None
    return int(number * _UNITS[match.group(2).upper()])


def format_size(octets: int) -> str:
    if octets == 0:
        return "unlimited"
    for unit in ("T", "G", "M", "K"):
        if octets % _UNITS[unit] == 0:
            return f"{octets // _UNITS[unit]}{unit}"
    return str(octets)


def _size_option(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    """Click callback: a size argument or option to octets."""
    if value is None:
        return None
    try:
        return parse_size(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None


class _Group(click.Group):
    """Turns postroom's own errors into one line on stderr and exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except PostroomError as exc:
            raise click.ClickException(str(exc)) from None
        except OSError as exc:
            where = f"{exc.filename}: " if exc.filename else ""
            raise click.ClickException(f"{where}{exc.strerror or exc}") from None


class _State:
    """What the subcommands share: the configuration and the store, opened on first use."""

    def __init__(self, config_path: Path | None) -> None:
        self.config_path = config_path
        self._config: config_mod.Config | None = None
        self._store: AccountStore | None = None
        self._server_key: ServerKey | None = None

    def config(self) -> config_mod.Config:
        if self._config is None:
            self._config = config_mod.load(self.config_path)
        return self._config

    def store(self) -> AccountStore:
        if self._store is None:
            self._store = AccountStore.for_config(self.config())
            click.get_current_context().find_root().call_on_close(self._store.close)
        return self._store

    def server_key(self) -> ServerKey:
        """``data_dir/keys/server.key``, made on first use (only CRAM-MD5 needs it here)."""
        if self._server_key is None:
            cfg = self.config()
            self._server_key = ServerKey.load_or_create(cfg.data_dir, owner=data_owner(cfg))
        return self._server_key


pass_state = click.make_pass_decorator(_State)


def _json_option(fn: Any) -> Any:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")(
        fn
    )


def _print_json(data: object) -> None:
    click.echo(json.dumps(data, indent=2, ensure_ascii=False))


def _print_table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*row)
    width = None if sys.stdout.isatty() else 160
    Console(file=sys.stdout, width=width).print(table)


def _read_password(password_stdin: bool) -> str:
    if password_stdin:
        line = sys.stdin.readline()
        password = line.removesuffix("\n").removesuffix("\r")
    else:
        password = click.prompt(
            "Password", hide_input=True, confirmation_prompt=True, prompt_suffix=": "
        )
    if not password:
        raise click.ClickException("the password is empty")
    return password


# --- the group -----------------------------------------------------------------------------


@click.group(cls=_Group)
@click.option(
    "-c",
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="POSTROOM_CONFIG",
    help="Configuration file (TOML). Also $POSTROOM_CONFIG. Default: built-in defaults.",
)
@click.version_option(__version__, prog_name="postroom")
@click.pass_context
def main(ctx: click.Context, config_path: Path | None) -> None:
    """postroom: a mail server (SMTP in, durable queue, Maildir delivery)."""
    ctx.obj = _State(config_path)


@main.command()
@click.option("--json", "json_logs", is_flag=True, help="Log one JSON object per line.")
@click.option("--log-file", type=click.Path(dir_okay=False, path_type=Path),
              help="Also append the log to this file.")
@pass_state
def serve(state: _State, json_logs: bool, log_file: Path | None) -> None:
    """Run the mail server until SIGTERM (SIGHUP reloads the configuration)."""
    from postroom.daemon import serve as run  # imported here: the account commands stay light

    cfg = state.config()
    overrides: dict[str, object] = {}
    if json_logs:
        overrides["log_json"] = True
    if log_file is not None:
        overrides["log_file"] = log_file
    if overrides:
        cfg = cfg.model_copy(update={"server": cfg.server.model_copy(update=overrides)})
    run(cfg)


# --- domains -------------------------------------------------------------------------------


@main.group()
def domain() -> None:
    """Local domains: mail for these is delivered here."""


@domain.command("add")
@click.argument("name")
@pass_state
def domain_add(state: _State, name: str) -> None:
    """Make NAME a local domain."""
    added = state.store().add_domain(name)
    click.echo(f"added domain {added}")


@domain.command("remove")
@click.argument("name")
@click.option("--force", is_flag=True, help="Also remove its users and aliases (mail is kept).")
@pass_state
def domain_remove(state: _State, name: str, force: bool) -> None:
    """Stop accepting mail for NAME."""
    state.store().remove_domain(name, force=force)
    click.echo(f"removed domain {name}")


@domain.command("list")
@_json_option
@pass_state
def domain_list(state: _State, as_json: bool) -> None:
    """List the local domains (the first is the primary domain)."""
    store = state.store()
    users: dict[str, int] = {}
    aliases: dict[str, int] = {}
    for user in store.list_users():
        users[user.domain] = users.get(user.domain, 0) + 1
    for alias in store.list_aliases():
        name = alias.source.rpartition("@")[2]
        aliases[name] = aliases.get(name, 0) + 1
    records = [
        {"name": d, "users": users.get(d, 0), "aliases": aliases.get(d, 0)}
        for d in store.list_domains()
    ]
    if as_json:
        _print_json(records)
        return
    rows = [[str(r["name"]), str(r["users"]), str(r["aliases"])] for r in records]
    _print_table("Domains", ["Domain", "Users", "Aliases"], rows)


# --- users ---------------------------------------------------------------------------------


@main.group()
def user() -> None:
    """Mailbox accounts."""


@user.command("add")
@click.argument("address")
@click.option(
    "--quota", callback=_size_option, help="Mailbox quota, e.g. 500M or 2G; 0 = unlimited."
)
@click.option("--password-stdin", is_flag=True, help="Read the password from one line of stdin.")
@click.option(
    "--allow-cram-md5",
    is_flag=True,
    help="Also keep a CRAM-MD5 secret (equivalent to the password; sealed with the server key).",
)
@pass_state
def user_add(
    state: _State, address: str, quota: int | None, password_stdin: bool, allow_cram_md5: bool
) -> None:
    """Add the account ADDRESS and make its Maildir."""
    cfg = state.config()
    store = state.store()
    canonical = store.check_new_user(address)  # refuse before asking for a password
    credentials = _derive(state, _read_password(password_stdin), canonical, cram_md5=allow_cram_md5)
    if quota is None:
        quota = cfg.delivery.default_quota
    added = store.add_user(
        address,
        credentials.password_hash,
        quota,
        scram_sha256=credentials.scram_sha256,
        cram_md5=credentials.cram_md5,
    )
    click.echo(f"added user {added.address} (maildir {added.maildir})")


def _derive(state: _State, password: str, address: str, *, cram_md5: bool) -> PasswordCredentials:
    """Every credential of *password* (argon2id, SCRAM-SHA-256, CRAM-MD5 when *cram_md5*)."""
    cfg = state.config()
    return derive_credentials(
        password,
        cfg.passwords,
        address=address,
        scram_iterations=cfg.auth.scram_iterations,
        cram_box=state.server_key().cram_box() if cram_md5 else None,
    )


@user.command("remove")
@click.argument("address")
@pass_state
def user_remove(state: _State, address: str) -> None:
    """Remove the account ADDRESS. Its Maildir stays on disk."""
    store = state.store()
    found = store.get_user(address)
    store.remove_user(address)
    kept = f" (mail kept in {found.maildir})" if found else ""
    click.echo(f"removed user {address}{kept}")


@user.command("passwd")
@click.argument("address")
@click.option("--password-stdin", is_flag=True, help="Read the password from one line of stdin.")
@pass_state
def user_passwd(state: _State, address: str, password_stdin: bool) -> None:
    """Set the password of ADDRESS.

    Derives every credential again: the argon2id hash, the SCRAM-SHA-256 keys (which accounts
    made before SCRAM support lack until this is run) and, if the account uses CRAM-MD5, its
    secret.
    """
    store = state.store()
    found = store.get_user(address)
    if found is None:
        raise click.ClickException(f"{address}: no such user")
    credentials = _derive(
        state, _read_password(password_stdin), found.address, cram_md5=found.cram_md5 is not None
    )
    store.set_password(
        found.address,
        credentials.password_hash,
        scram_sha256=credentials.scram_sha256,
        cram_md5=credentials.cram_md5,
    )
    click.echo(f"password changed for {address}")


@user.command("cram-md5")
@click.argument("address")
@click.argument("setting", type=click.Choice(["on", "off"]))
@click.option("--password-stdin", is_flag=True, help="Read the password from one line of stdin.")
@pass_state
def user_cram_md5(state: _State, address: str, setting: str, password_stdin: bool) -> None:
    """Let ADDRESS use CRAM-MD5 (on), or delete its CRAM-MD5 secret (off).

    CRAM-MD5 needs a secret equivalent to the password, so turning it on asks for the account's
    current password (checked against the stored hash) and keeps it sealed with the server key.
    """
    store = state.store()
    found = store.get_user(address)
    if found is None:
        raise click.ClickException(f"{address}: no such user")
    if setting == "off":
        store.set_cram_md5(found.address, None)
        click.echo(f"CRAM-MD5 off for {found.address} (secret deleted)")
        return
    password = _read_password(password_stdin)
    if not verify_password(found.password_hash, password):
        raise click.ClickException(
            f"{found.address}: that is not the account's password (to change it, use "
            "`postroom user passwd`)"
        )
    sealed = seal_cram_secret(state.server_key().cram_box(), found.address, password)
    store.set_cram_md5(found.address, sealed)
    click.echo(f"CRAM-MD5 on for {found.address}")


@user.command("quota")
@click.argument("address")
@click.argument("size", callback=_size_option)
@pass_state
def user_quota(state: _State, address: str, size: int) -> None:
    """Set the quota of ADDRESS (e.g. 500M, 2G; 0 = unlimited)."""
    state.store().set_quota(address, size)
    click.echo(f"quota of {address} is {format_size(size)}")


def _user_record(entry: User) -> dict[str, object]:
    return {
        "address": entry.address,
        "quota": entry.quota,
        "maildir": str(entry.maildir),
        "created": entry.created.isoformat(),
        "mechanisms": list(entry.mechanisms),
    }


@user.command("list")
@click.argument("domain_name", metavar="[DOMAIN]", required=False)
@_json_option
@pass_state
def user_list(state: _State, domain_name: str | None, as_json: bool) -> None:
    """List the accounts, of one DOMAIN or all."""
    users = state.store().list_users(domain_name)
    if as_json:
        _print_json([_user_record(u) for u in users])
        return
    rows = [
        [
            u.address,
            format_size(u.quota),
            " ".join(u.mechanisms),
            str(u.maildir),
            u.created.strftime("%Y-%m-%d %H:%M"),
        ]
        for u in users
    ]
    _print_table("Users", ["Address", "Quota", "Mechanisms", "Maildir", "Created (UTC)"], rows)


@user.group("sender")
def user_sender() -> None:
    """Extra envelope senders an account may use after logging in.

    An account may always send as its own address, with a +tag, and as any alias whose
    destinations name it; grant anything else here: one address, or @domain for all of a domain.
    """


@user_sender.command("add")
@click.argument("address")
@click.argument("senders", nargs=-1, required=True)
@pass_state
def user_sender_add(state: _State, address: str, senders: tuple[str, ...]) -> None:
    """Let ADDRESS also send as each SENDER (local@domain or @domain)."""
    store = state.store()
    for sender in senders:
        added = store.add_sender(address, sender)
        click.echo(f"{added.login} may send as {added.sender}")


@user_sender.command("remove")
@click.argument("address")
@click.argument("sender")
@pass_state
def user_sender_remove(state: _State, address: str, sender: str) -> None:
    """Withdraw SENDER from ADDRESS."""
    state.store().remove_sender(address, sender)
    click.echo(f"{address} may no longer send as {sender}")


@user_sender.command("list")
@click.argument("address", required=False)
@_json_option
@pass_state
def user_sender_list(state: _State, address: str | None, as_json: bool) -> None:
    """List the sender grants, of one ADDRESS or all."""
    store = state.store()
    if address is not None and store.get_user(address) is None:
        raise click.ClickException(f"{address}: no such user")
    grants = store.list_senders(address)
    if as_json:
        _print_json([{"login": g.login, "sender": g.sender} for g in grants])
        return
    _print_table("Senders", ["Login", "May send as"], [[g.login, g.sender] for g in grants])


# --- aliases -------------------------------------------------------------------------------


@main.group()
def alias() -> None:
    """Aliases; SOURCE @domain is the domain's catch-all."""


@alias.command("add")
@click.argument("source")
@click.argument("destinations", nargs=-1, required=True)
@pass_state
def alias_add(state: _State, source: str, destinations: tuple[str, ...]) -> None:
    """Deliver mail for SOURCE to each DESTINATION (local or remote addresses)."""
    store = state.store()
    for destination in destinations:
        added = store.add_alias(source, destination)
        click.echo(f"added alias {added.source} -> {added.destination}")


@alias.command("remove")
@click.argument("source")
@click.argument("destination", required=False)
@pass_state
def alias_remove(state: _State, source: str, destination: str | None) -> None:
    """Remove DESTINATION from SOURCE, or the whole alias SOURCE."""
    count = state.store().remove_alias(source, destination)
    click.echo(f"removed {count} alias row(s) for {source}")


@alias.command("list")
@click.argument("domain_name", metavar="[DOMAIN]", required=False)
@_json_option
@pass_state
def alias_list(state: _State, domain_name: str | None, as_json: bool) -> None:
    """List the aliases, of one DOMAIN or all."""
    aliases = state.store().list_aliases(domain_name)
    if as_json:
        _print_json([{"source": a.source, "destination": a.destination} for a in aliases])
        return
    _print_table("Aliases", ["Source", "Destination"], [[a.source, a.destination] for a in aliases])


# --- check-config --------------------------------------------------------------------------


def _warnings(cfg: config_mod.Config) -> list[str]:
    notes: list[str] = []
    if "." not in cfg.hostname:
        notes.append(
            f"hostname {cfg.hostname!r} is not fully qualified (RFC 5321 4.1.1.1); set "
            "server.hostname"
        )
    if not cfg.data_dir.exists():
        notes.append(f"data dir {cfg.data_dir} does not exist yet; it will be created")
    seen: set[tuple[str, int]] = set()
    for listener in cfg.listeners():
        if listener.host_port() in seen:
            notes.append(f"listener {listener.address} is configured twice")
        seen.add(listener.host_port())
    return notes


@main.command("check-config")
@pass_state
def check_config(state: _State) -> None:
    """Load the configuration, report problems, print a summary."""
    try:
        cfg = state.config()
    except ConfigError as exc:
        for line in str(exc).splitlines():
            click.echo(f"error: {line}", err=True)
        sys.exit(1)
    click.echo(f"config: {cfg.source or 'built-in defaults'}")
    click.echo(f"hostname: {cfg.hostname}")
    click.echo(f"data dir: {cfg.data_dir}")
    click.echo("listeners:")
    for listener in cfg.listeners():
        click.echo(f"  {listener.role} {listener.address}")
    trusted = ", ".join(cfg.relay.trusted_networks) or "none (nobody may relay)"
    click.echo(f"trusted networks: {trusted}")
    for note in _warnings(cfg):
        click.echo(f"warning: {note}", err=True)
    click.echo("configuration OK")
