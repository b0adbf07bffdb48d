"""The in-memory store of CRI pull credentials: the four AuthConfig forms, expiry, per-repository vs
per-host entries, and the registry client using it (before docker config.json) against real Basic
and Bearer-token registries."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from converter.format.errors import AuthError
from converter.registry.client import RegistryClient
from converter.registry.config import RegistryConfig
from converter.registry.credential_store import AuthConfig, CredentialStore
from converter.registry.reference import ImageReference
from peerpull.testbed.oci_layout import LayerSpec, write_layout
from tests.support.auth_registry import PASSWORD, USER, TokenServer, htpasswd_registry, write_docker_config


class Clock:
    """time.monotonic() moved forward at will (the Authenticator compares expiries with it)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


# ---- forms, expiry, keys ------------------------------------------------------------------------

@pytest.mark.parametrize(("auth", "kind", "user", "password"), [
    (AuthConfig(username="u", password="p"), "basic", "u", "p"),
    (AuthConfig(auth=b64("u:p:with:colons")), "basic", "u", "p:with:colons"),
    (AuthConfig(username="u", identity_token="refresh"), "identity_token", "u", None),
    (AuthConfig(registry_token="bearer"), "registry_token", None, None),
])
def test_each_authconfig_form(auth: AuthConfig, kind: str, user: str | None, password: str | None) -> None:
    store = CredentialStore(60)
    assert store.put("reg.example:5000/team/app:1", auth) is not None
    creds = store.lookup("reg.example:5000", "team/app")
    assert creds is not None and creds.kind == kind and creds.username == user and creds.password == password
    if kind == "identity_token":
        assert creds.identity_token == "refresh"
    if kind == "registry_token":
        assert creds.registry_token == "bearer"
    # secrets stay out of reprs (and so out of log lines and tracebacks)
    for secret in ("p:with:colons", "refresh", "bearer", "'p'"):
        assert secret not in repr(creds)


def test_anonymous_and_malformed_pulls_store_nothing() -> None:
    store = CredentialStore(60)
    assert store.put("reg.example/team/app:1", AuthConfig()) is None
    with pytest.raises(ValueError):
        store.put("reg.example/team/app:1", AuthConfig(auth=b64("no-colon")))
    with pytest.raises(ValueError):
        store.put("reg.example/team/app:1", AuthConfig(auth="%%%not-base64"))
    with pytest.raises(ValueError):
        store.put("bad host!/app:1", AuthConfig(username="u", password="p"))
    assert len(store) == 0 and store.lookup("reg.example", "team/app") is None


def test_expiry_and_renewal() -> None:
    clock = Clock()
    store = CredentialStore(100, clock=clock)
    store.put("reg.example/team/app:1", AuthConfig(username="u", password="p"))
    clock.offset = 99
    assert store.lookup("reg.example", "team/app") is not None
    clock.offset = 101
    assert store.lookup("reg.example", "team/app") is None
    assert "expired" in (store.explain("reg.example", "team/app") or "")
    assert len(store) == 0
    store.put("reg.example/team/app:2", AuthConfig(username="u", password="p"))  # the next pull renews
    assert store.lookup("reg.example", "team/app") is not None and store.explain("reg.example", "team/app") is None


def test_per_repository_before_per_host() -> None:
    store = CredentialStore(60)
    store.put("reg.example/team/a:1", AuthConfig(username="a", password="pa"))
    store.put("reg.example/team/b:1", AuthConfig(username="b", password="pb"))

    def user(repository: str, registry: str = "reg.example") -> str | None:
        creds = store.lookup(registry, repository)
        return creds.username if creds else None

    assert (user("team/a"), user("team/b")) == ("a", "b")
    assert user("team/other") == "b"  # the host's entry: its latest pull
    assert user("team/a", "other.example") is None
    store.drop("reg.example/team/b:1", "refused")
    assert user("team/b") is None and user("team/other") is None  # the host's entry was b's too
    assert user("team/a") == "a"
    assert store.explain("reg.example", "team/b") == "refused"
    store.drop("reg.example/team/a:1", "refused")
    assert len(store) == 0


def test_a_refusal_drops_only_the_credentials_it_was_about() -> None:
    store = CredentialStore(60)
    old = store.put("reg.example/team/a:1", AuthConfig(username="a", password="old"))
    store.put("reg.example/team/a:2", AuthConfig(username="a", password="new"))  # a later pull renewed them
    store.drop("reg.example/team/a:1", "refused", old)
    creds = store.lookup("reg.example", "team/a")
    assert creds is not None and creds.password == "new"


# ---- the registry client asks the store first ---------------------------------------------------

@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    layer = LayerSpec()
    layer.add("hello.txt", b"hello from a private repository\n" * 100)
    root = tmp_path_factory.mktemp("credstore") / "layout"
    write_layout(root, [layer.tar_bytes()])
    return root


@pytest.fixture()
def token_server(tmp_path: Path) -> Iterator[TokenServer]:
    import threading

    loop = asyncio.new_event_loop()
    server = TokenServer(tmp_path / "token")
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(server.start(), loop).result(10)
    try:
        yield server
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)


def push(address: str, layout: Path, tmp_path: Path) -> str:
    config = write_docker_config(tmp_path / "push-creds", address, USER, PASSWORD) / "config.json"
    target = f"{address}/private/app:seekable"
    result = subprocess.run([sys.executable, "-m", "peerpull", "--log-level", "error", "--docker-config", str(config),
                             "convert", "--quiet", f"oci:{layout}:latest", target],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return target


def no_docker_config(tmp_path: Path) -> RegistryConfig:
    path = tmp_path / "empty-docker" / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"auths": {}}))
    return RegistryConfig(docker_config=str(path))


async def manifest_or_error(client: RegistryClient, target: str) -> str:
    try:
        return (await client.get_manifest(ImageReference.parse(target))).digest
    except AuthError as exc:
        return f"error: {exc}"


def exercise_expiry(config: RegistryConfig, target: str, auth: AuthConfig) -> list[str]:
    """Manifest fetches: with the stored credentials, after they expire (the cached header must
    not outlive them), after a renewing pull."""
    clock = Clock()
    store = CredentialStore(100, clock=clock)

    async def run() -> list[str]:
        async with RegistryClient(config) as client:
            client.use_credentials(store)
            before = await manifest_or_error(client, target)  # anonymous: nothing stored yet
            store.put(target, auth)
            first = await manifest_or_error(client, target)
            clock.offset = 200
            expired = await manifest_or_error(client, target)
            store.put(target, auth)
            renewed = await manifest_or_error(client, target)
            return [before, first, expired, renewed]
    return asyncio.run(run())


def check(results: list[str]) -> None:
    before, first, expired, renewed = results
    assert before.startswith("error:") and "anonymous" in before
    assert first.startswith("sha256:") and renewed == first
    assert expired.startswith("error:") and "expired" in expired, expired
    assert PASSWORD not in "".join(results)


def test_basic_registry_uses_stored_credentials(tmp_path: Path, layout: Path) -> None:
    with htpasswd_registry(tmp_path / "registry") as registry:
        target = push(registry.address, layout, tmp_path)
        check(exercise_expiry(no_docker_config(tmp_path), target, AuthConfig(auth=b64(f"{USER}:{PASSWORD}"))))


def test_bearer_registry_uses_stored_credentials(tmp_path: Path, layout: Path, token_server: TokenServer) -> None:
    with token_server.registry(tmp_path / "registry") as registry:
        target = push(registry.address, layout, tmp_path)
        issued = token_server.issued
        check(exercise_expiry(no_docker_config(tmp_path), target, AuthConfig(username=USER, password=PASSWORD)))
        assert token_server.issued >= issued + 2  # a token for the first pull, a new one after the renewal


def test_registry_token_is_sent_as_it_is(tmp_path: Path, layout: Path, token_server: TokenServer) -> None:
    with token_server.registry(tmp_path / "registry") as registry:
        target = push(registry.address, layout, tmp_path)

        async def run() -> str:
            async with aiohttp.ClientSession() as session:  # what kubelet would have been handed
                basic = {"Authorization": "Basic " + b64(f"{USER}:{PASSWORD}")}
                async with session.get(token_server.url, headers=basic,
                                       params={"scope": "repository:private/app:pull"}) as resp:
                    token = (await resp.json())["token"]
            store = CredentialStore(100)
            store.put(target, AuthConfig(registry_token=token))
            issued = token_server.issued
            async with RegistryClient(no_docker_config(tmp_path)) as client:
                client.use_credentials(store)
                digest = await manifest_or_error(client, target)
            assert token_server.issued == issued  # the token server was not asked again
            return digest
        assert asyncio.run(run()).startswith("sha256:")
