"""Shared fixtures: real registries, a token server and a real containerd.

pytest puts this directory on ``sys.path`` (rootdir conftest, no
``__init__.py``), so tests import the harness as ``from support.registry
import Registry``. Every process a fixture starts is stopped at teardown.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from support.containerd import Containerd, unavailable_reason
from support.node import NodeFactory, NodeProcess
from support.registry import REGISTRY_BINARY, Registry
from support.tls import TlsFiles, make_tls_files
from support.tokenserver import TokenServer

# Every test's traffic stays on this host, so a proxy set for the machine
# that runs them (a CI runner's HTTPS_PROXY, say) must not reach the nodes
# the tests start, nor the tests' own clients. Tests of proxy support set
# what they need themselves.
for _name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
    os.environ.pop(_name, None)
    os.environ.pop(_name.lower(), None)

TEST_USER = "alice"


@pytest.fixture
def registry_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., Registry]]:
    """Starts registries on demand: ``registry_factory(**Registry kwargs)``.

    Use it for several upstreams in one test, or for proxy mode:
    ``registry_factory(proxy_remote=upstream.url)``.
    """
    if not Path(REGISTRY_BINARY).exists():
        pytest.skip(f"{REGISTRY_BINARY} is not installed")
    started: list[Registry] = []

    def start(**kwargs: Any) -> Registry:
        registry = Registry(tmp_path_factory.mktemp("registry"), **kwargs)
        started.append(registry)
        registry.start()
        return registry

    yield start
    for registry in started:
        registry.stop()


@pytest.fixture
def registry(registry_factory: Callable[..., Registry]) -> Registry:
    """A plain (no auth) docker-registry on 127.0.0.1."""
    return registry_factory()


@pytest.fixture(scope="module")
def module_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """One plain registry for a module's tests, which only read from it.

    Images pushed by module-scoped fixtures are shared by the module's tests;
    a test that counts the registry's requests compares differences.
    """
    if not Path(REGISTRY_BINARY).exists():
        pytest.skip(f"{REGISTRY_BINARY} is not installed")
    with Registry(tmp_path_factory.mktemp("registry")) as registry:
        yield registry


@pytest.fixture
def basic_auth_registry(registry_factory: Callable[..., Registry]) -> Registry:
    """A docker-registry behind basic auth; ``.credentials`` may push and pull.

    The password is random per test, so a test can search logs for it.
    """
    return registry_factory(htpasswd=(TEST_USER, secrets.token_urlsafe(16)))


# An HTTPS upstream, from a CA the test makes.
@pytest.fixture
def tls_files(tmp_path: Path) -> TlsFiles:
    return make_tls_files(tmp_path / "tls")


@pytest.fixture
def tls_registry(
    registry_factory: Callable[..., Registry], tls_files: TlsFiles
) -> Registry:
    registry = registry_factory(tls=tls_files)
    assert registry.url.startswith("https://")
    return registry


@pytest.fixture
def token_server() -> Iterator[TokenServer]:
    """A started token server knowing ``alice`` with a random password."""
    with TokenServer({TEST_USER: secrets.token_urlsafe(16)}) as server:
        yield server


@pytest.fixture
def token_auth_registry(
    registry_factory: Callable[..., Registry], token_server: TokenServer
) -> Registry:
    """A docker-registry trusting ``token_server``; ``.credentials`` is alice's."""
    return registry_factory(token_server=token_server)


@pytest.fixture
def containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Containerd]:
    """A private containerd daemon (skipped when not root or not installed)."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    with Containerd(tmp_path_factory.mktemp("containerd")) as daemon:
        yield daemon


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator[NodeFactory]:
    """Starts ``tcr-mirror node`` processes: ``node_factory(*args, ...)``.

    Keyword arguments: ``data_dir`` (default: a fresh one in ``tmp_path``)
    and ``config`` (TOML text, written to a file passed as ``--config``).
    Each node logs to its own ``tmp_path/node<n>.log``. Every node is killed
    at teardown.
    """
    started: list[NodeProcess] = []

    def start(
        *args: str, data_dir: Path | None = None, config: str | None = None
    ) -> NodeProcess:
        n = len(started)
        options = list(args)
        if config is not None:
            config_path = tmp_path / f"node{n}.toml"
            config_path.write_text(config)
            options = ["--config", str(config_path), *options]
        data = data_dir or tmp_path / f"data{n}"
        node = NodeProcess(data, options, log_path=tmp_path / f"node{n}.log")
        started.append(node)
        return node.start()

    yield start
    # SIGKILL: no test looks at a node after it ends, and a graceful stop
    # of every node would add seconds to a file's run.
    for node in started:
        node.kill()
