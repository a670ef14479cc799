"""``tcr-mirror control``: operate TCR, keep node tokens fresh, read the audit log.

Every TCR call made here goes through one :class:`TcrClient` whose
``on_call`` hook appends to the audit log, failed calls included. Keys come
from ``--credentials-file`` or the ``TENCENTCLOUD_SECRET_ID`` /
``TENCENTCLOUD_SECRET_KEY`` environment variables, never from a flag (a flag
would show in ``ps`` and shell history). A TCR error is one line,
``tcr-mirror: error: <Code>: <message> (RequestId ...)``, and exit status 1.

Most subcommands are one TCR action each and are declared in the tables
below (:data:`CALLS`): arguments, how they become the action's parameters,
and how the answer reads as text.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

import httpx
import trio

from ..cli import CliError
from ._audit import (
    AuditLog,
    audit_hook,
    event_time,
    query,
    read_events,
    redact,
    verify,
)
from ._client import CallRecord, TcrClient
from ._commands import CALLS, CallCommand, blank, call
from ._credentials import CloudCredentials
from ._errors import TcrError
from ._serve import ControlMetrics, TokenKeeper, resolve_registries, tcr_issuer
from ._serve import run as run_serve

__all__ = ["register"]

_DEFAULT_ENDPOINT = "https://tcr.tencentcloudapi.com"
_DEFAULT_REGION = "ap-guangzhou"
_DEFAULT_AUDIT_LOG = "tcr-mirror-audit.jsonl"


# --- parser --------------------------------------------------------------


def _common(**defaults: Any) -> argparse.ArgumentParser:
    # Leaves get SUPPRESS defaults so that options given after the
    # subcommand do not reset those given before it; the real defaults sit
    # on `control` alone. (Parents share action objects, hence two parsers.)
    common = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    common.add_argument("--endpoint", metavar="URL", help="TCR API endpoint")
    common.add_argument("--region", metavar="REGION", help="TCR region")
    common.add_argument(
        "--credentials-file",
        metavar="FILE",
        help="TOML with secret_id and secret_key (else TENCENTCLOUD_SECRET_ID "
        "and TENCENTCLOUD_SECRET_KEY)",
    )
    common.add_argument("--audit-log", metavar="FILE", help="audit log (JSON lines)")
    common.add_argument("--output", choices=("text", "json"), help="output format")
    common.set_defaults(**defaults)
    return common


def register(subparsers: Any) -> None:
    """Add ``tcr-mirror control`` and its subcommands."""
    common = _common()
    top = _common(
        endpoint=os.environ.get("TCR_MIRROR_ENDPOINT", _DEFAULT_ENDPOINT),
        region=os.environ.get("TENCENTCLOUD_REGION", _DEFAULT_REGION),
        credentials_file=None,
        audit_log=os.environ.get("TCR_MIRROR_AUDIT_LOG", _DEFAULT_AUDIT_LOG),
        output="text",
    )
    control = subparsers.add_parser(
        "control",
        parents=[top],
        help="operate TCR: tokens, endpoints, replication, desired state, audit",
        description="Operate Tencent Container Registry through its cloud API. "
        "Every call is recorded in the audit log.",
    )
    families = control.add_subparsers(dest="family", metavar="COMMAND", required=True)
    for family, help_text, commands in CALLS:
        parser = families.add_parser(family, help=help_text, description=help_text)
        leaves = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
        if family == "tokens":
            _add_token_create(leaves, common)
        for command in commands:
            leaf = leaves.add_parser(command.name, parents=[common], help=command.help)
            for item in command.args:
                leaf.add_argument(*item.names, **item.options)
            leaf.set_defaults(func=_runner(_call_command(command)))
    _add_desired(families, common)
    _add_serve(families, common)
    _add_audit(families, common)


def _add_token_create(leaves: Any, common: argparse.ArgumentParser) -> None:
    leaf = leaves.add_parser(
        "create",
        parents=[common],
        help="create a temporary or long-term token",
        description="Create an instance token. The token is a secret: it is "
        "written only to --token-file (mode 0600; '-' for stdout).",
    )
    leaf.add_argument("registry_id", metavar="REGISTRY_ID")
    leaf.add_argument("--type", default="temp", choices=("temp", "longterm"))
    leaf.add_argument("--desc", default="")
    leaf.add_argument("--token-file", required=True, metavar="FILE")
    leaf.set_defaults(func=_runner(_token_create))


def _add_desired(families: Any, common: argparse.ArgumentParser) -> None:
    for name, help_text, handler in (
        ("plan", "show what apply would change", _plan),
        ("apply", "make TCR match a desired-state file", _apply),
    ):
        leaf = families.add_parser(name, parents=[common], help=help_text)
        leaf.add_argument("file", metavar="FILE", help="desired state (TOML)")
        if name == "apply":
            leaf.add_argument(
                "--poll-interval",
                type=_seconds,
                default=2.0,
                help="seconds between status checks while waiting",
            )
        leaf.set_defaults(func=_runner(handler))


def _seconds(value: str) -> float:
    """An argparse type: a finite number of seconds, not negative."""
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds < 0:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {value!r}")
    return seconds


def _add_serve(families: Any, common: argparse.ArgumentParser) -> None:
    leaf = families.add_parser(
        "serve",
        parents=[common],
        help="keep temporary tokens fresh and serve them to node daemons",
    )
    leaf.add_argument("--listen", default="127.0.0.1:8750", metavar="HOST:PORT")
    leaf.add_argument("--metrics-listen", metavar="HOST:PORT")
    leaf.add_argument("--node-secret-file", required=True, metavar="FILE")
    leaf.add_argument(
        "--registry",
        action="append",
        required=True,
        metavar="HOST=REGISTRY_ID",
        help="a registry to serve (repeatable); a bare REGISTRY_ID is "
        "served under its public domain",
    )
    leaf.add_argument("--renew-fraction", type=float, default=2 / 3)
    leaf.set_defaults(func=_serve)


def _add_audit(families: Any, common: argparse.ArgumentParser) -> None:
    audit = families.add_parser(
        "audit", parents=[common], help="query or verify the audit log"
    )
    audit.add_argument("--event", action="append", metavar="NAME")
    audit.add_argument("--since", metavar="TIME", help="unix seconds or ISO 8601")
    audit.add_argument("--until", metavar="TIME", help="unix seconds or ISO 8601")
    audit.add_argument("--errors", action="store_true", help="failed calls only")
    audit.add_argument("--log", metavar="FILE", help="same as --audit-log")
    audit.set_defaults(func=_audit_query)
    verbs = audit.add_subparsers(dest="verb", metavar="VERB")
    check = verbs.add_parser(
        "verify", parents=[common], help="check the hash chain of the audit log"
    )
    check.add_argument(
        "--log", metavar="FILE", default=argparse.SUPPRESS, help="same as --audit-log"
    )
    check.set_defaults(func=_audit_verify)


# --- running -------------------------------------------------------------


Handler = Callable[["Session", argparse.Namespace], Awaitable[int]]


class AuditWriteError(OSError):
    """A TCR call was made but its audit event could not be written.

    An OSError, so that ``control serve`` treats it like any failed
    renewal; a one-line error for the other commands.
    """


class Session:
    """Credentials, audit log and TCR clients (one per region) of one run."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        _check_endpoint(args.endpoint)
        self.credentials = _credentials(args)
        try:
            self.audit = AuditLog(args.audit_log)
        except OSError as exc:
            raise CliError(
                f"cannot open audit log {args.audit_log}: {exc.strerror}"
            ) from None
        self.metrics: ControlMetrics | None = None
        self._hook = audit_hook(
            self.audit,
            secret_id=self.credentials.secret_id,
            source_ip=_source_ip(args.endpoint),
        )
        self._clients: dict[str, TcrClient] = {}

    async def on_call(self, call: CallRecord) -> None:
        """Audit every call; count it when serving metrics."""
        # The append fsyncs: in a worker thread, so that ``control serve``
        # keeps answering nodes meanwhile.
        try:
            await trio.to_thread.run_sync(self._hook, call)
        except OSError as exc:
            raise AuditWriteError(
                exc.errno,
                f"{call.action} was sent to TCR but cannot be recorded: "
                f"cannot write audit log {self.audit.path}: {exc.strerror}",
            ) from None
        if self.metrics is not None:
            self.metrics.on_call(call)

    def client(self, region: str | None = None) -> TcrClient:
        """The client for ``region`` (default: ``--region``)."""
        region = region or self.args.region
        if region not in self._clients:
            self._clients[region] = TcrClient(
                self.credentials,
                region=region,
                endpoint=self.args.endpoint,
                on_call=self.on_call,
            )
        return self._clients[region]

    async def aclose(self) -> None:
        """Close every client and the audit log."""
        for client in self._clients.values():
            await client.aclose()
        self.audit.close()


def _credentials(args: argparse.Namespace) -> CloudCredentials:
    try:
        if args.credentials_file:
            return CloudCredentials.from_file(args.credentials_file)
        return CloudCredentials.from_env(os.environ)
    except ValueError as exc:
        raise CliError(str(exc)) from None


def _check_endpoint(endpoint: str) -> None:
    try:
        httpx.URL(endpoint)
        # httpx takes a port past 65535; the source address probe does not.
        urlsplit(endpoint).port  # noqa: B018 (raises ValueError)
    except (httpx.InvalidURL, ValueError) as exc:
        # Not echoed: its user info may hold a password.
        raise CliError(f"--endpoint is not a usable URL: {exc}") from None


def _source_ip(endpoint: str) -> str:
    """The local address calls to ``endpoint`` leave from ('' if unknown)."""
    url = urlsplit(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        # A UDP connect sends nothing; it only picks the route and address.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((url.hostname or "", port))
            return str(probe.getsockname()[0])
    except (OSError, UnicodeError):
        return ""


def _runner(handler: Handler) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        session = Session(args)

        async def main() -> int:
            try:
                return await handler(session, args)
            finally:
                await session.aclose()

        try:
            return trio.run(main)
        except TcrError as exc:
            print(f"tcr-mirror: error: {exc}", file=sys.stderr)
            return 1
        except AuditWriteError as exc:
            print(f"tcr-mirror: error: {exc.strerror}", file=sys.stderr)
            return 1

    return run


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    if args.output == "json":
        text = json.dumps(data, indent=2, ensure_ascii=False, default=str)
    try:
        print(text, flush=True)
    except BrokenPipeError:
        # The reader left (`| head`): stop quietly, and keep the interpreter
        # from failing again when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _call_command(command: CallCommand) -> Handler:
    async def handle(session: Session, args: argparse.Namespace) -> int:
        try:
            params = command.params(args)
        except ValueError as exc:
            raise CliError(str(exc)) from None
        answer = await call(session.client(), command, params)
        data = {**redact(answer.data), "RequestId": answer.request_id}
        if command.text is not None:
            text = command.text(answer)
        else:
            text = f"{command.action}: ok (RequestId {answer.request_id})"
        _emit(args, data, text)
        return 0

    return handle


async def _token_create(session: Session, args: argparse.Namespace) -> int:
    params = {"RegistryId": args.registry_id, "TokenType": args.type}
    if args.desc:
        params["Desc"] = args.desc
    answer = await session.client().call("CreateInstanceToken", params)
    expires = _expiry(answer.data.get("ExpTime"))
    secret = {
        "registry_id": args.registry_id,
        "username": answer.data.get("Username"),
        "password": answer.data.get("Token"),
        "token_id": answer.data.get("TokenId") or None,
        "expires_at": expires,
    }
    _write_secret(args.token_file, secret)
    if expires is None:
        # Saved all the same: the token exists in TCR and cannot be shown
        # again.
        raise CliError(
            f"token created and written to {args.token_file}, but its ExpTime "
            f"is not a time: {answer.data.get('ExpTime')!r}"
        )
    if args.token_file == "-":
        return 0
    data = {**redact(answer.data), "RequestId": answer.request_id}
    data["TokenFile"] = args.token_file
    when = _iso(expires)
    text = (
        f"created {args.type} token for {args.registry_id} "
        f"(user {answer.data.get('Username')}, expires {when}"
        + (f", id {answer.data['TokenId']}" if answer.data.get("TokenId") else "")
        + f"); written to {args.token_file}"
    )
    _emit(args, data, text)
    return 0


def _write_secret(path: str, secret: Mapping[str, Any]) -> None:
    if path == "-":
        print(json.dumps(secret))
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        # The mode of open() only applies to a new file; one left from an
        # earlier run may be readable by others.
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as file:
            json.dump(secret, file)
            file.write("\n")
    except OSError as exc:
        # The token exists in TCR now; say so, since it cannot be shown again.
        raise CliError(
            f"token created but not saved: cannot write {path}: {exc.strerror}"
        ) from None


def _iso(unix: float) -> str:
    moment = datetime.datetime.fromtimestamp(unix, tz=datetime.UTC)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def _event_iso(event: Mapping[str, Any]) -> str:
    when = event_time(event)
    try:
        return _iso(when) if when is not None else f"{event.get('eventTime')!r:<20}"
    except (OverflowError, ValueError, OSError):
        return f"{event.get('eventTime')!r:<20}"


def _expiry(exp_time: Any) -> float | None:
    """TCR's ``ExpTime`` (epoch ms) in unix seconds; None if unreadable."""
    try:
        expires = float(exp_time) / 1000
        _iso(expires)
    except (TypeError, ValueError, OverflowError, OSError):
        return None
    return expires


# --- plan / apply ---------------------------------------------------------


def _load(path: str) -> Any:
    from ._desired import load_desired

    try:
        return load_desired(path)
    except ValueError as exc:
        raise CliError(str(exc)) from None


def _applied_rules(session: Session) -> Any:
    from ._reconcile import rules_from_audit

    return rules_from_audit(read_events(session.audit.path))


async def _plan(session: Session, args: argparse.Namespace) -> int:
    from ._reconcile import plan

    desired = _load(args.file)
    changes = await plan(session.client, desired, applied_rules=_applied_rules(session))
    if not changes:
        text = "no changes: TCR matches the desired state"
    else:
        text = "\n".join([f"{len(changes)} change(s):", *map(str, changes)])
    _emit(args, {"changes": [c.as_json() for c in changes]}, text)
    return 0


async def _apply(session: Session, args: argparse.Namespace) -> int:
    from ._reconcile import apply

    desired = _load(args.file)
    report = await apply(
        session.client,
        desired,
        applied_rules=_applied_rules(session),
        poll_interval=args.poll_interval,
    )
    if report.nothing_to_do:
        text = "nothing to do: TCR matches the desired state"
    else:
        lines = [f"done     {change}" for change in report.done]
        if report.failed is not None:
            lines.append(f"FAILED   {report.failed}: {report.error}")
        lines += [f"skipped  {change}" for change in report.not_attempted]
        lines.append(
            f"{len(report.done)} done, {int(report.failed is not None)} failed, "
            f"{len(report.not_attempted)} not attempted"
        )
        text = "\n".join(lines)
    _emit(args, report.as_json(), text)
    return 0 if report.ok else 1


# --- serve ------------------------------------------------------------------


def _address(value: str, option: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise CliError(f"{option} wants HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def _node_secret(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as file:
            secret = file.read().strip()
    except OSError as exc:
        raise CliError(
            f"cannot read --node-secret-file {path}: {exc.strerror}"
        ) from None
    except UnicodeDecodeError:
        raise CliError(f"--node-secret-file {path} is not UTF-8 text") from None
    if not secret:
        raise CliError(f"--node-secret-file {path} is empty")
    return secret


def _serve(args: argparse.Namespace) -> int:
    import logging

    listen = _address(args.listen, "--listen")
    metrics_listen = None
    if args.metrics_listen:
        metrics_listen = _address(args.metrics_listen, "--metrics-listen")
    secret = _node_secret(args.node_secret_file)
    if not 0 < args.renew_fraction < 1:
        raise CliError("--renew-fraction must be between 0 and 1")
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
        # httpx logs every request at info as plain text; ours are JSON lines.
        logging.getLogger("httpx").setLevel(logging.WARNING)

    async def serve(session: Session, args: argparse.Namespace) -> int:
        session.metrics = ControlMetrics()
        client = session.client()
        try:
            registries = await resolve_registries(client, args.registry)
        except ValueError as exc:
            raise CliError(str(exc)) from None
        keeper = TokenKeeper(
            list(registries),
            tcr_issuer(client, registries),
            metrics=session.metrics,
            schedule=lambda: _schedule(args.renew_fraction),
        )

        def ready(addresses: dict[str, Any]) -> None:
            event = {"event": "control_serve_listening", **addresses}
            print(json.dumps({**event, "registries": registries}), file=sys.stderr)
            sys.stderr.flush()

        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(
                        lambda: run_serve(
                            keeper,
                            secret,
                            listen,
                            metrics_listen=metrics_listen,
                            on_ready=ready,
                        )
                    )
                    async for _ in signals:
                        nursery.cancel_scope.cancel()
                        break
            except BaseExceptionGroup as group:
                # The nurseries wrap a port already taken in exception
                # groups; it is a one-line error like any other.
                error = _only_os_error(group)
                if error is None:
                    raise
                raise CliError(error.strerror or str(error)) from None
        return 0

    return _runner(serve)(args)


def _only_os_error(group: BaseExceptionGroup[BaseException]) -> OSError | None:
    matched, rest = group.split(OSError)
    if matched is None or rest is not None:
        return None
    leaf: BaseException = matched
    while isinstance(leaf, BaseExceptionGroup):
        leaf = leaf.exceptions[0]
    return leaf if isinstance(leaf, OSError) else None


def _schedule(fraction: float) -> Any:
    import random

    from ._serve import RenewalSchedule

    return RenewalSchedule(renew_fraction=fraction, jitter=0.2, rng=random.Random())


# --- audit ----------------------------------------------------------------


def _log_path(args: argparse.Namespace) -> str:
    return str(getattr(args, "log", None) or args.audit_log)


def _time(value: str | None, option: str) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        moment = datetime.datetime.fromisoformat(value)
    except ValueError:
        raise CliError(f"{option} wants unix seconds or ISO 8601: {value!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return moment.timestamp()


@contextmanager
def _reading(path: str) -> Iterator[None]:
    try:
        yield
    except FileNotFoundError:
        raise CliError(f"no audit log at {path}") from None
    except OSError as exc:
        raise CliError(f"cannot read audit log {path}: {exc.strerror}") from None


def _audit_query(args: argparse.Namespace) -> int:
    path = _log_path(args)
    since, until = _time(args.since, "--since"), _time(args.until, "--until")
    with _reading(path):
        try:
            events = query(
                path,
                events=args.event,
                since=since,
                until=until,
                errors_only=args.errors,
            )
        except ValueError as exc:
            raise CliError(f"audit log {path}: {exc}") from None
    lines = [
        f"{_event_iso(e)}  {e.get('eventName', '?')!s:<36} "
        f"{blank(e.get('resourceName'))!s:<16} "
        f"{'OK' if e.get('errorCode') in (0, '0', '') else e.get('errorCode')}  "
        f"{blank(e.get('requestID'))}"
        for e in events
    ]
    _emit(args, events, "\n".join(lines) if lines else "(no events)")
    return 0


def _audit_verify(args: argparse.Namespace) -> int:
    path = _log_path(args)
    with _reading(path):
        result = verify(path)
    data = {
        "ok": result.ok,
        "lines": result.lines,
        "bad_line": result.bad_line,
        "reason": result.reason,
        "detail": result.detail,
        "torn_tail": result.torn_tail,
        "last_hash": result.last_hash,
    }
    if result.ok:
        _emit(args, data, f"{path}: {result}")
        return 0
    if args.output == "json":
        _emit(args, data, "")
    print(f"tcr-mirror: error: {path}: {result}", file=sys.stderr)
    return 1
