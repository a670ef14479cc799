"""A real upstream for tests: Debian's docker-registry (distribution 2.8).

Each ``Registry`` is one ``docker-registry serve`` process on 127.0.0.1 with
its own storage and log file under a work directory. It runs plain, behind
basic auth (an htpasswd file hashed with bcrypt, which is all 2.8 accepts),
behind token auth (our ``TokenServer``), or as a pull-through proxy of
another registry.

What the registry served is read back from its access log. distribution
writes two kinds of lines: JSON "response completed" events from the app
(these miss requests refused before dispatch, such as 401s and unknown
routes) and an Apache combined-format access line per request from the
outermost handler. We parse the combined lines because every request gets
one:

    127.0.0.1 - - [03/Dec/2026:13:45:16 +0000] "GET /v2/ HTTP/1.1" 200 2 "" "ua"

The line is written just after the response ends, so a client can finish
reading before it is there; ``access_log()`` therefore sends a marker
request and waits until the marker is logged before it reads.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import socket
import ssl
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs

import httpx

from .processes import stop_process
from .tls import TlsFiles
from .tokenserver import TokenServer

__all__ = ["AccessLogEntry", "Registry", "RegistryStartError", "free_port"]

REGISTRY_BINARY = "/usr/bin/docker-registry"
_START_TIMEOUT = 15.0
_PORT_ATTEMPTS = 5
_SYNC_AGENT = "tcr-mirror-test-log-sync/"

_ACCESS_LINE = re.compile(
    r"^(?P<remote>\S+) \S+ (?P<user>\S+) \[(?P<time>[^\]]+)\] "
    r'"(?P<method>[A-Z]+) (?P<uri>\S+) (?P<proto>[^"]+)" '
    r"(?P<status>\d{3}) (?P<bytes>\d+|-) "
    r'"(?P<referer>(?:[^"\\]|\\.)*)" "(?P<agent>(?:[^"\\]|\\.)*)"$'
)


class RegistryStartError(RuntimeError):
    """docker-registry did not come up; the message carries its log tail."""


@dataclass(frozen=True)
class AccessLogEntry:
    """One request as the registry logged it."""

    method: str
    uri: str
    status: int
    bytes: int
    user_agent: str
    remote: str

    @property
    def path(self) -> str:
        """The URI without its query string."""
        return self.uri.partition("?")[0]

    @property
    def query(self) -> str:
        """The raw query string (containerd sends ``ns=127.0.0.1%3A5000``)."""
        return self.uri.partition("?")[2]

    @property
    def params(self) -> dict[str, list[str]]:
        """The query, decoded: ``{"ns": ["127.0.0.1:5000"]}``."""
        return parse_qs(self.query)


def parse_access_line(line: str) -> AccessLogEntry | None:
    """Parses one combined-format access line; other lines give None."""
    match = _ACCESS_LINE.match(line.rstrip("\n"))
    if match is None:
        return None
    size = match["bytes"]
    return AccessLogEntry(
        method=match["method"],
        uri=match["uri"],
        status=int(match["status"]),
        bytes=0 if size == "-" else int(size),
        user_agent=match["agent"].replace('\\"', '"'),
        remote=match["remote"],
    )


def free_port() -> int:
    """Returns a port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Registry:
    """One docker-registry process; use as a context manager or start/stop.

    Args:
        workdir: a directory of its own (storage, config, log go in it).
        htpasswd: ``(user, password)`` to run behind basic auth.
        token_server: a started ``TokenServer`` to run behind token auth.
        proxy_remote: upstream URL to run as a pull-through cache.
        proxy_credentials: ``(user, password)`` for ``proxy_remote``.
        tls: serve HTTPS with these files (``support.tls``) instead of HTTP.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        htpasswd: tuple[str, str] | None = None,
        token_server: TokenServer | None = None,
        proxy_remote: str | None = None,
        proxy_credentials: tuple[str, str] | None = None,
        tls: TlsFiles | None = None,
    ) -> None:
        if htpasswd is not None and token_server is not None:
            raise ValueError("choose basic auth or token auth, not both")
        self.workdir = workdir
        self.htpasswd = htpasswd
        self.token_server = token_server
        self.proxy_remote = proxy_remote
        self.proxy_credentials = proxy_credentials
        self.tls = tls
        self.log_path = workdir / "registry.log"
        self.storage = workdir / "storage"
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._sync_count = 0

    # What tests use.

    @property
    def url(self) -> str:
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    @functools.cached_property
    def verify(self) -> ssl.SSLContext | bool:
        """What an httpx client must trust to talk to this registry (made once)."""
        if self.tls is None:
            return True
        return ssl.create_default_context(cafile=self.tls.ca)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def credentials(self) -> tuple[str, str] | None:
        """A ``(user, password)`` that may push and pull, if auth is on."""
        if self.htpasswd is not None:
            return self.htpasswd
        if self.token_server is not None:
            return next(iter(self.token_server.users.items()), None)
        return None

    def access_log(self) -> list[AccessLogEntry]:
        """Every request served so far, oldest first (log-sync markers left out).

        Raises:
            TimeoutError: the marker request never showed up in the log.
        """
        self._sync_count += 1
        marker = f"{_SYNC_AGENT}{self._sync_count}"
        httpx.get(
            f"{self.url}/v2/",
            headers={"User-Agent": marker},
            timeout=5,
            verify=self.verify,
        )

        deadline = time.monotonic() + 5
        while True:
            entries = self._read_access_log()
            if any(entry.user_agent == marker for entry in entries):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"log marker {marker} never logged")
            time.sleep(0.01)
        return [e for e in entries if not e.user_agent.startswith(_SYNC_AGENT)]

    def requests_for(
        self, method: str, path: str, *, user_agent_prefix: str = ""
    ) -> list[AccessLogEntry]:
        """Logged requests with this method and path (query ignored)."""
        return [
            entry
            for entry in self.access_log()
            if entry.method == method
            and entry.path == path
            and entry.user_agent.startswith(user_agent_prefix)
        ]

    def blob_gets(self, repo: str, digest: str, user_agent_prefix: str = "") -> int:
        """How many ``GET /v2/<repo>/blobs/<digest>`` the registry served."""
        path = f"/v2/{repo}/blobs/{digest}"
        return len(self.requests_for("GET", path, user_agent_prefix=user_agent_prefix))

    # Lifecycle.

    def start(self) -> None:
        """Starts the process and waits until ``/v2/`` answers.

        After ``stop()``, starts again on the same port with the same storage.

        Raises:
            RegistryStartError: it exited or did not answer in time.
        """
        if not Path(REGISTRY_BINARY).exists():
            raise RegistryStartError(f"{REGISTRY_BINARY} is not installed")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.storage.mkdir(exist_ok=True)
        self._write_auth_files()

        # A restart keeps the port, so a test can take an upstream down and
        # bring it back at the same URL. A first start takes a port that was
        # free when we looked; another process may grab it before
        # docker-registry binds, so it tries a few.
        attempts = 1 if self.port else _PORT_ATTEMPTS
        for attempt in range(attempts):
            if not self.port or attempt:
                self.port = free_port()
            config = self.workdir / "config.yml"
            config.write_text(json.dumps(self._config()))
            if self._launch(config):
                return
            if attempt == attempts - 1 or not self._lost_port_race():
                raise RegistryStartError(self._failure_message())

    @property
    def pid(self) -> int | None:
        """The running registry's process id, or None when it is not running."""
        return self._process.pid if self._process is not None else None

    def stop(self) -> None:
        """Terminates the process (kills it if it lingers); safe to repeat."""
        process, self._process = self._process, None
        if process is not None:
            stop_process(process)

    def __enter__(self) -> Registry:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # Internals.

    def _config(self) -> dict[str, object]:
        # YAML is a superset of JSON, so the config is written as JSON.
        config: dict[str, object] = {
            "version": 0.1,
            "log": {
                "level": "info",
                "formatter": "json",
                "accesslog": {"disabled": False},
            },
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage)},
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {"addr": self.host, "secret": uuid.uuid4().hex},
        }
        if self.tls is not None:
            config["http"] = {
                "addr": self.host,
                "secret": uuid.uuid4().hex,
                "tls": {
                    "certificate": str(self.tls.certificate),
                    "key": str(self.tls.key),
                },
            }
        auth = self._auth_config()
        if auth is not None:
            config["auth"] = auth
        if self.proxy_remote is not None:
            proxy = {"remoteurl": self.proxy_remote}
            if self.proxy_credentials is not None:
                proxy["username"], proxy["password"] = self.proxy_credentials
            config["proxy"] = proxy
        return config

    def _auth_config(self) -> dict[str, object] | None:
        if self.htpasswd is not None:
            path = str(self.workdir / "htpasswd")
            return {"htpasswd": {"realm": "test-registry", "path": path}}
        if self.token_server is not None:
            server = self.token_server
            bundle = self.workdir / "token-cert.pem"
            return {
                "token": {
                    "realm": server.realm,
                    "service": server.service,
                    "issuer": server.issuer,
                    "rootcertbundle": str(bundle),
                }
            }
        return None

    def _write_auth_files(self) -> None:
        if self.htpasswd is not None:
            self._write_htpasswd(*self.htpasswd)
        if self.token_server is not None:
            self.token_server.write_cert_bundle(self.workdir / "token-cert.pem")

    def _write_htpasswd(self, user: str, password: str) -> None:
        # distribution only accepts bcrypt entries; the stdlib has no bcrypt.
        tool = shutil.which("htpasswd")
        if tool is None:
            raise RegistryStartError("htpasswd (apache2-utils) is not installed")
        entry = subprocess.run(
            [tool, "-Bbn", user, password],
            check=True,
            capture_output=True,
            timeout=30,
        ).stdout
        (self.workdir / "htpasswd").write_bytes(entry.strip() + b"\n")

    def _launch(self, config: Path) -> bool:
        """Starts one process; True once ``/v2/`` answers, False if it exited."""
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [REGISTRY_BINARY, "serve", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                self._process = None
                return False
            try:
                headers = {"User-Agent": f"{_SYNC_AGENT}ready"}
                httpx.get(
                    f"{self.url}/v2/", headers=headers, timeout=1, verify=self.verify
                )
            except httpx.TransportError:
                time.sleep(0.02)
                continue
            return True
        self.stop()
        raise RegistryStartError(f"no answer in time; {self._failure_message()}")

    def _lost_port_race(self) -> bool:
        return "address already in use" in self._log_text()

    def _log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _failure_message(self) -> str:
        tail = " | ".join(self._log_text().strip().splitlines()[-5:])
        return f"docker-registry failed to start: {tail}"

    def _read_access_log(self) -> list[AccessLogEntry]:
        entries = []
        for line in self._log_text().splitlines():
            entry = parse_access_line(line)
            if entry is not None:
                entries.append(entry)
        return entries
