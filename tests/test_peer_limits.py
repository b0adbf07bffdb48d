"""The small pieces the peer server's limits are made of: byte budget, origin policy, frame bounds."""

from __future__ import annotations

import argparse
import asyncio

from peer.budget import ByteBudget
from peer.chunk import ChunkRef
from peer.client import frame_limit
from peer.policy import OriginPolicy
from peerpull.commands.peer_cmd import with_peer_flags
from peerpull.config import PeerpullConfig, load_config


async def test_the_byte_budget_waits_in_order_and_lets_an_oversized_request_through_alone() -> None:
    budget = ByteBudget(100)
    await budget.acquire(60)
    second = asyncio.ensure_future(budget.acquire(60))  # does not fit: waits
    third = asyncio.ensure_future(budget.acquire(10))  # would fit, but waits its turn behind the second
    await asyncio.sleep(0)
    assert not second.done() and not third.done() and budget.used == 60
    budget.release(60)
    await second
    await third
    assert budget.used == 70
    budget.release(70)
    await budget.acquire(500)  # bigger than the whole budget: granted when nothing else is held
    assert budget.used == 500
    cancelled = asyncio.ensure_future(budget.acquire(1))
    await asyncio.sleep(0)
    cancelled.cancel()
    await asyncio.gather(cancelled, return_exceptions=True)
    budget.release(500)
    assert budget.used == 0


def test_the_origin_policy_trusts_what_was_configured_or_learned_only() -> None:
    policy = OriginPolicy(("Reg.Local:5000",))
    assert policy.allows_repository("reg.local:5000/ml/torch")
    assert not policy.allows_repository("evil.example:80/x/y") and not policy.allows_repository("")
    assert not policy.allows_repository("127.0.0.1:1/../../etc")
    policy.learn("ghcr.io")
    assert policy.allows_repository("ghcr.io/org/app")
    assert OriginPolicy(("*",)).allows_repository("anything.example/x")


def test_a_frame_may_be_no_larger_than_its_chunk_can_compress_to() -> None:
    ref = ChunkRef("sha256:" + "a" * 64, 1 << 20, "r:1/x", "sha256:" + "b" * 64, 0, 1000)
    assert (1 << 20) < frame_limit(ref) < (1 << 20) + (16 << 10)
    assert frame_limit(ChunkRef(ref.digest, ref.length, ref.repository, ref.blob, 0, 3 << 20)) == 3 << 20


def test_peer_flags_and_the_environment_set_token_rule_and_trusted_registries() -> None:
    config = load_config(environ={"PEERPULL_PEER_TRUSTED_REGISTRIES": "a:5000,b"})
    assert config.peer.trusted_registries == ("a:5000", "b") and not config.peer.insecure_no_token
    args = argparse.Namespace(insecure_no_token=True, trusted_registries=["c:1"])
    changed = with_peer_flags(args, config)
    assert changed.peer.insecure_no_token and changed.peer.trusted_registries == ("a:5000", "b", "c:1")
    assert with_peer_flags(argparse.Namespace(), PeerpullConfig()) == PeerpullConfig()
