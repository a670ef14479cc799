"""A small client for a registry's push API, for tests.

Blobs go up as distribution's monolithic upload (POST to open an upload,
PUT with ``?digest=``) or, for big files, as PATCH chunks then a closing PUT,
so memory stays bounded. Manifests go up with PUT. ``RegistryAuth`` answers
the registry's 401 challenge: Basic, or Bearer through the token realm.
"""

from __future__ import annotations

import base64
import re
import ssl
from collections.abc import Generator
from pathlib import Path
from typing import Protocol

import httpx

from .layers import digest_of

__all__ = ["PushError", "PushTarget", "Pusher", "RegistryAuth"]

_UPLOAD_CHUNK = 16 << 20


class PushTarget(Protocol):
    """What a push needs of a registry (``support.registry.Registry`` fits)."""

    @property
    def url(self) -> str: ...

    @property
    def credentials(self) -> tuple[str, str] | None: ...

    @property
    def verify(self) -> ssl.SSLContext | bool:
        """What to trust for HTTPS: a context, or True for the system's CAs."""
        ...


class PushError(RuntimeError):
    """The registry refused a push step; carries the status and body."""

    def __init__(self, step: str, response: httpx.Response) -> None:
        super().__init__(f"{step}: HTTP {response.status_code} {response.text[:300]}")
        self.status = response.status_code


def _challenge(header: str) -> tuple[str, dict[str, str]]:
    scheme, _, rest = header.partition(" ")
    return scheme.lower(), dict(re.findall(r'(\w+)="([^"]*)"', rest))


def _repository_of(path: str) -> str:
    """``/v2/a/b/blobs/uploads/x`` -> ``a/b``; ``""`` for ``/v2/``."""
    match = re.match(r"^/v2/(.+?)/(?:blobs|manifests|tags|referrers)/", path)
    return match.group(1) if match else ""


class RegistryAuth(httpx.Auth):
    """Answers registry 401 challenges: Basic, or Bearer via the token realm.

    Tokens are kept per repository, so later requests to the same
    repository carry one up front and request bodies are sent only once.
    """

    requires_response_body = True

    def __init__(self, credentials: tuple[str, str] | None) -> None:
        self._credentials = credentials
        self._basic = False
        self._tokens: dict[str, str] = {}

    def __repr__(self) -> str:
        return "RegistryAuth(<credentials hidden>)"

    def auth_flow(
        self, request: httpx.Request
    ) -> Generator[httpx.Request, httpx.Response, None]:
        self._authorize(request)
        response = yield request
        if response.status_code != 401:
            return

        scheme, params = _challenge(response.headers.get("WWW-Authenticate", ""))
        if scheme == "basic" and self._credentials is not None:
            self._basic = True
        elif scheme == "bearer" and "realm" in params:
            token_response = yield self._token_request(params)
            if token_response.status_code != 200:
                return
            body = token_response.json()
            token = body.get("token") or body.get("access_token")
            self._tokens[_repository_of(request.url.path)] = token
        else:
            return
        self._authorize(request)
        yield request

    def _authorize(self, request: httpx.Request) -> None:
        token = self._tokens.get(_repository_of(request.url.path))
        if token is not None:
            request.headers["Authorization"] = f"Bearer {token}"
        elif self._basic and self._credentials is not None:
            request.headers["Authorization"] = _basic_header(self._credentials)

    def _token_request(self, params: dict[str, str]) -> httpx.Request:
        query = {k: v for k, v in params.items() if k in ("service", "scope")}
        request = httpx.Request("GET", params["realm"], params=query)
        if self._credentials is not None:
            request.headers["Authorization"] = _basic_header(self._credentials)
        return request


def _basic_header(credentials: tuple[str, str]) -> str:
    user, password = credentials
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# The push client.


class Pusher:
    """A small push client for one registry; use as a context manager."""

    def __init__(self, target: PushTarget, *, chunk_size: int = _UPLOAD_CHUNK) -> None:
        self._chunk_size = chunk_size
        self._client = httpx.Client(
            base_url=target.url,
            auth=RegistryAuth(target.credentials),
            verify=target.verify,
            timeout=60,
            headers={"User-Agent": "tcr-mirror-test-push/1"},
        )

    def __enter__(self) -> Pusher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._client.close()

    def blob(self, repo: str, data: bytes) -> str:
        """Uploads ``data`` unless already there.

        Returns:
            Its digest.

        Raises:
            PushError: the registry refused a step.
        """
        digest = digest_of(data)
        if self._has_blob(repo, digest):
            return digest
        location = self._open_upload(repo)
        response = self._client.put(
            _with_digest(location, digest),
            content=data,
            headers={"Content-Type": "application/octet-stream"},
        )
        _expect(response, 201, f"PUT blob {digest}")
        return digest

    def blob_file(self, repo: str, path: Path, digest: str) -> str:
        """Uploads a file in PATCH chunks, never holding it all in memory."""
        if self._has_blob(repo, digest):
            return digest
        location = self._open_upload(repo)
        offset = 0
        with path.open("rb") as source:
            while chunk := source.read(self._chunk_size):
                end = offset + len(chunk) - 1
                headers = {
                    "Content-Type": "application/octet-stream",
                    "Content-Range": f"{offset}-{end}",
                }
                response = self._client.patch(location, content=chunk, headers=headers)
                _expect(response, 202, f"PATCH blob {digest} at {offset}")
                location = response.headers["Location"]
                offset = end + 1
        response = self._client.put(_with_digest(location, digest))
        _expect(response, 201, f"PUT blob {digest}")
        return digest

    def manifest(self, repo: str, reference: str, data: bytes, media_type: str) -> str:
        """Puts a manifest under a tag or its digest; returns its digest."""
        response = self._client.put(
            f"/v2/{repo}/manifests/{reference}",
            content=data,
            headers={"Content-Type": media_type},
        )
        _expect(response, 201, f"PUT manifest {repo}:{reference}")
        digest = digest_of(data)
        if response.headers.get("Docker-Content-Digest", digest) != digest:
            raise PushError(f"digest mismatch for {repo}:{reference}", response)
        return digest

    def _has_blob(self, repo: str, digest: str) -> bool:
        response = self._client.head(f"/v2/{repo}/blobs/{digest}")
        return response.status_code == 200

    def _open_upload(self, repo: str) -> str:
        response = self._client.post(f"/v2/{repo}/blobs/uploads/")
        _expect(response, 202, f"POST upload {repo}")
        return response.headers["Location"]


def _with_digest(location: str, digest: str) -> str:
    # httpx's params= would replace the upload's _state query, not add to it.
    separator = "&" if "?" in location else "?"
    return f"{location}{separator}digest={digest}"


def _expect(response: httpx.Response, status: int, step: str) -> None:
    if response.status_code != status:
        raise PushError(step, response)
