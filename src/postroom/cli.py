"""The ``postroom`` command: accounts, domains, aliases and configuration checks.

::

    postroom [-c FILE] domain add|list|remove ...
    postroom [-c FILE] user add|list|remove|passwd|quota|cram-md5 ...
    postroom [-c FILE] user sender add|list|remove ...
    postroom [-c FILE] alias add|list|remove ...
    postroom [-c FILE] check-config
    postroom [-c FILE] queue list|show|flush|hold|release|delete|retry ...
    mailq [-c FILE]

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
from postroom.store import quota as maildirsize

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
    store = state.store()
    store.set_quota(address, size)
    found = store.get_user(address)
    if found is not None:
        _rewrite_maildirsize(found.maildir, size)
    click.echo(f"quota of {address} is {format_size(size)}")


def _rewrite_maildirsize(maildir: Path, size: int) -> None:
    """Bring the Maildir++ ``maildirsize`` in line with the new quota now (the server would do
    it at the next delivery, on seeing another definition): counted afresh with the new first
    line, or removed for no quota, so that nobody keeps appending to a file no check reads."""
    try:
        if size == 0:
            maildirsize.remove(maildir)
        elif (maildir / "tmp").is_dir():
            maildirsize.recalc(maildir, maildirsize.Definition(size))
    except OSError as exc:  # the server recalculates it on its own; say so and go on
        click.echo(f"warning: {maildir / maildirsize.FILENAME} not updated: {exc}", err=True)


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


# --- the queue -----------------------------------------------------------------------------
#
# Reading (list, show, mailq) reads the queue files directly, so it works whether or not the
# server runs. Changes go through the running server's control socket, which serialises them with
# the deliveries; with no server listening they are made on the files directly.

#: postsuper's word for every message.
_ALL = "ALL"
#: How long the CLI waits for the server to carry out a change (ALL on a big queue rewrites many
#: files; the server works on them one by one, between deliveries).
_SERVER_TIMEOUT = 600.0

# Postfix's mailq layout for long queue ids (postqueue's showq_compat, enable_long_queue_ids):
# postroom's ids are 12 characters, one more for the "!" of a held message.
_MQ_ID_WIDTH, _MQ_SIZE_WIDTH, _MQ_TIME_WIDTH = 17, 8, 19
_MQ_HEADINGS = ("----Queue ID-----", "--Size--", "---Arrival Time----", "--Sender/Recipient------")


def _mq_line(queue_id: str, size: str, arrival: str, text: str) -> str:
    return (
        f"{queue_id:<{_MQ_ID_WIDTH}} {size:>{_MQ_SIZE_WIDTH}} "
        f"{arrival[:_MQ_TIME_WIDTH]:<{_MQ_TIME_WIDTH}} {text}"
    )


def format_mailq(entries: list[dict[str, Any]]) -> str:
    """The listing in Postfix's ``mailq`` layout, from :meth:`QueueEntry.to_dict` records.

    A message line (id, ``!`` when held, size, arrival time, sender or MAILER-DAEMON), then each
    recipient not yet done, each preceded by its last error in parentheses, right-aligned, when
    that differs from the previous recipient's; a blank line between messages; a total.
    """
    if not entries:
        return "Mail queue is empty\n"
    import time

    out = [_mq_line(*_MQ_HEADINGS)]
    total = 0
    for number, entry in enumerate(entries):
        if number:
            out.append("")
        total += int(entry["size"])
        marked = entry["queue_id"] + ("!" if entry["held"] else "")
        arrival = time.asctime(time.localtime(float(entry["arrival"])))
        out.append(_mq_line(marked, str(entry["size"]), arrival, entry["sender"] or "MAILER-DAEMON"))
        previous = ""
        for rcpt in entry["recipients"]:
            if rcpt["state"] in ("delivered", "bounced"):
                continue
            reason = rcpt["last_error"] or ""
            if reason != previous:
                shown = reason or "reason unavailable"
                out.append(f"{'':>{max(0, 76 - len(shown))}}({shown})")
                previous = reason
            out.append(_mq_line("", "", "", rcpt["address"]))
    count = len(entries)
    out.append("")
    out.append(f"-- {total // 1024} Kbytes in {count} Request{'' if count == 1 else 's'}.")
    return "\n".join(out) + "\n"


def _local_time(stamp: float | None) -> str:
    import time

    if not stamp:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp))


def _next_attempt(rcpt: dict[str, Any], now: float) -> str:
    if rcpt["state"] not in ("pending", "deferred"):
        return "-"
    if float(rcpt["next_attempt"]) <= now:
        return "now"
    return _local_time(float(rcpt["next_attempt"]))


def _data_dir(state: _State) -> Path:
    return state.config().data_dir


def _queue_request(state: _State, op: str, args: dict[str, Any]) -> dict[str, Any]:
    """Ask the running server; with none listening, do it on the files. Adds ``via``."""
    from postroom.net import control
    from postroom.queue import admin

    data_dir = _data_dir(state)
    response = control.call(control.socket_path(data_dir), op, args, timeout=_SERVER_TIMEOUT)
    via = "server"
    if response is None:
        response = admin.dispatch(data_dir, op, args)
        via = "files"
    if not response.get("ok"):
        raise click.ClickException(str(response.get("error") or "the request failed"))
    return {**response, "via": via}


def _ids_args(ids: tuple[str, ...]) -> dict[str, Any]:
    if _ALL in ids:
        if len(ids) > 1:
            raise click.UsageError(f"{_ALL} stands alone: give queue ids, or {_ALL}")
        return {"ids": _ALL}
    return {"ids": list(ids)}


_DONE_TEXT = {
    "held": "placed on hold",
    "released": "released from hold",
    "deleted": "removed",
    "flushed": "due for delivery now",
    "retried": "due for delivery now, attempt count reset",
}


def _report(response: dict[str, Any], as_json: bool) -> None:
    """Print what a changing operation did; exit 1 if a message was missing or failed."""
    results: list[dict[str, str]] = response["results"]
    failed = [r for r in results if r["result"] in ("missing", "error")]
    if as_json:
        _print_json(response)
    else:
        if not results:
            click.echo("no messages")
        for result in results:
            qid, what, detail = result["queue_id"], result["result"], result["detail"]
            if what in _DONE_TEXT:
                click.echo(f"{qid}: {_DONE_TEXT[what]}")
            elif what == "unchanged":
                click.echo(f"{qid}: unchanged ({detail})")
            elif what == "missing":
                click.echo(f"{qid}: no such message", err=True)
            else:
                click.echo(f"{qid}: {what}: {detail}", err=True)
    if failed:
        sys.exit(1)


_IDS = click.argument("ids", nargs=-1, required=True, metavar="ID... | ALL")


@main.group()
def queue() -> None:
    """The mail queue: list, show, flush, hold, release, delete, retry.

    Changes go through the running server (its control socket), or act on the queue files when
    no server runs.
    """


@queue.command("list")
@_json_option
@pass_state
def queue_list(state: _State, as_json: bool) -> None:
    """List the queued messages, each recipient with its state and last error (`mailq` prints
    the same in Postfix's layout)."""
    import time

    from postroom.queue import admin

    records = [e.to_dict() for e in admin.list_queue(_data_dir(state))]
    if as_json:
        _print_json(records)
        return
    if not records:
        click.echo("Mail queue is empty")
        return
    now = time.time()
    rows: list[list[str]] = []
    for entry in records:
        first = [
            entry["queue_id"] + ("!" if entry["held"] else ""),
            str(entry["size"]),
            _local_time(entry["arrival"]),
            entry["sender"] or "<>",
        ]
        for number, rcpt in enumerate(entry["recipients"] or [{}]):
            lead = first if number == 0 else ["", "", "", ""]
            if not rcpt:
                rows.append([*lead, "", "", "", "", ""])
                continue
            rows.append([
                *lead,
                rcpt["address"],
                rcpt["state"],
                str(rcpt["attempts"]),
                _next_attempt(rcpt, now),
                rcpt["last_error"] or "",
            ])
    total = sum(int(e["size"]) for e in records)
    _print_table(
        f"Queue: {len(records)} message(s), {total} octets (! = on hold)",
        ["Queue ID", "Size", "Arrival", "Sender", "Recipient", "State", "Attempts",
         "Next attempt", "Last error"],
        rows,
    )


@queue.command("show")
@click.argument("queue_id", metavar="ID")
@_json_option
@pass_state
def queue_show(state: _State, queue_id: str, as_json: bool) -> None:
    """Show one message: envelope, recipients with their attempts, and its header section."""
    import time

    from postroom.queue import admin

    try:
        found = admin.show(_data_dir(state), queue_id)
    except admin.AdminError as exc:
        raise click.ClickException(str(exc)) from None
    if found is None:
        raise click.ClickException(f"{queue_id}: no such message")
    if as_json:
        _print_json(found)
        return
    now = time.time()
    env = found["envelope"]
    where = "on hold" if found["held"] else "active"
    client = env.get("client_name") or "unknown"
    lines = [
        f"Queue ID:  {found['queue_id']} ({where})",
        f"Arrival:   {_local_time(found['arrival'])}",
        f"Sender:    <{found['sender']}>",
        f"Client:    {client}[{env.get('client_address', '')}], helo {env.get('helo') or '-'}",
        f"Size:      {found['size']} octets in the queue file, {env.get('size', 0)} as received",
    ]
    extras = [f"{key}={env[key]}" for key in ("body_type", "ret", "envid") if env.get(key)]
    if env.get("smtputf8"):
        extras.append("smtputf8")
    if extras:
        lines.append(f"Options:   {' '.join(extras)}")
    lines.append("Recipients:")
    for rcpt in found["recipients"]:
        original = f" (to <{rcpt['original']}>)" if rcpt["original"] != rcpt["address"] else ""
        lines.append(f"  <{rcpt['address']}>{original}")
        lines.append(
            f"    state {rcpt['state']}, attempts {rcpt['attempts']}, "
            f"next attempt {_next_attempt(rcpt, now)}"
        )
        if rcpt["last_error"]:
            lines.append(f"    last error: {rcpt['last_error']}")
        for event in rcpt["history"]:
            stamp = event.get("time")
            when = _local_time(float(stamp)) if isinstance(stamp, (int, float)) else str(stamp)
            lines.append(f"    {when}  {event.get('result', '')}  {event.get('detail', '')}".rstrip())
    lines.append("Headers:")
    lines.extend(f"  {line}" for line in found["headers"].splitlines())
    if found["headers_truncated"]:
        lines.append("  [... header section cut here]")
    click.echo("\n".join(lines))


@queue.command("flush")
@click.argument("ids", nargs=-1, metavar="[ID... | ALL]")
@click.option("--domain", help="Only recipients in this domain (postqueue -s).")
@_json_option
@pass_state
def queue_flush(state: _State, ids: tuple[str, ...], domain: str | None, as_json: bool) -> None:
    """Deliver now: the recipients of each ID (all messages without one) that wait for a retry.

    Messages on hold are left alone. Like `postqueue -f`, `-i ID` and `-s DOMAIN`.
    """
    if ids and domain is not None:
        raise click.UsageError("give queue ids or --domain, not both")
    args: dict[str, Any] = _ids_args(ids) if ids else {}
    if domain is not None:
        args["domain"] = domain
    _report(_queue_request(state, "flush", args), as_json)


@queue.command("retry")
@_IDS
@_json_option
@pass_state
def queue_retry(state: _State, ids: tuple[str, ...], as_json: bool) -> None:
    """Flush, and set the recipients' attempt counts back to 0 so the backoff starts again.

    Bounced recipients stay bounced; the message still expires queue.max_lifetime after arrival.
    """
    _report(_queue_request(state, "retry", _ids_args(ids)), as_json)


@queue.command("hold")
@_IDS
@_json_option
@pass_state
def queue_hold(state: _State, ids: tuple[str, ...], as_json: bool) -> None:
    """Put messages on hold: no delivery until released (postsuper -h). ALL: every active one."""
    _report(_queue_request(state, "hold", _ids_args(ids)), as_json)


@queue.command("release")
@_IDS
@_json_option
@pass_state
def queue_release(state: _State, ids: tuple[str, ...], as_json: bool) -> None:
    """Release messages from hold, due at once (postsuper -H). ALL: every held one."""
    _report(_queue_request(state, "release", _ids_args(ids)), as_json)


@queue.command("delete")
@_IDS
@_json_option
@pass_state
def queue_delete(state: _State, ids: tuple[str, ...], as_json: bool) -> None:
    """Delete messages, active or held, without any notification (postsuper -d). ALL: every one."""
    _report(_queue_request(state, "delete", _ids_args(ids)), as_json)


# --- mailq ---------------------------------------------------------------------------------


@click.command("mailq")
@click.option(
    "-c",
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="POSTROOM_CONFIG",
    help="Configuration file (TOML). Also $POSTROOM_CONFIG.",
)
@_json_option
def mailq(config_path: Path | None, as_json: bool) -> None:
    """List the mail queue in Postfix's mailq layout (`!` after the id: on hold)."""
    from postroom.queue import admin

    try:
        data_dir = config_mod.load(config_path).data_dir
        records = [e.to_dict() for e in admin.list_queue(data_dir)]
    except PostroomError as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        raise click.ClickException(f"{where}{exc.strerror or exc}") from None
    if as_json:
        _print_json(records)
        return
    click.echo(format_mailq(records), nl=False)


def mailq_main() -> None:
    """The ``mailq`` console script."""
    mailq(prog_name="mailq")
