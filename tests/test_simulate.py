"""The cluster simulation (bench/sim) and the fan-out it measures: chunk trees over the ring
(peer/ring.py), membership's ancestors, and the hedged, load-aware source choice (peer/sources.py).

Simulated clusters run the real peer code on a virtual clock with real frame bytes, so "every node
holds every working-set frame" is checked against each frame's sha256; times asserted here are
virtual (deterministic), never wall-clock."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from peer.chunk import ChunkRef
from peer.client import PeerFetchError
from peer.config import PeerConfig
from peer.membership import Member, Membership
from peer.ring import STAR, Ring, ranked
from peer.sources import SLOW_STRIKES, PeerSources, SourceExhausted

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from sim import clock  # noqa: E402
from sim.cluster import Scenario, Shape, run_scenario  # noqa: E402
from sim.feed import synthetic  # noqa: E402

DIGESTS = [f"sha256:{i:064x}" for i in range(200)]


@pytest.fixture(scope="module")
def feed():  # real bytes: receivers check each frame's sha256
    return synthetic(6 << 20, seed=7, real_bytes=True)


def test_twenty_nodes_fetch_each_frame_from_the_origin_once(feed) -> None:
    outcome = clock.run(run_scenario(feed, PeerConfig(), Shape(), Scenario(20)))
    assert len(outcome.ready_s) == 20 and outcome.unfinished == 0
    assert outcome.complete  # every node, every frame, right digest
    assert outcome.egress_bytes == feed.bytes


def test_churn_keeps_egress_near_one_and_every_node_complete(feed) -> None:
    # 10 % of 20 nodes: two join and two leave while the others start. Each costs about 1/N of the
    # working set at the origin (a joiner ranks first for 1/N of the chunks; a leaver took the only
    # copy of the chunks it ranked first for and had fetched): about 1 + 4/20
    outcome = clock.run(run_scenario(feed, PeerConfig(), Shape(), Scenario(20, churn=0.1, churn_window_s=0.05)))
    assert outcome.complete and outcome.unfinished == 0
    assert len(outcome.ready_s) == 20  # 18 stayed + 2 joined
    assert outcome.egress_bytes <= 1.25 * feed.bytes


def test_dead_and_slow_peers_are_routed_around(feed) -> None:
    outcome = clock.run(run_scenario(feed, PeerConfig(), Shape(), Scenario(20, faulty=0.1)))
    assert outcome.complete and outcome.unfinished == 0
    assert len(outcome.ready_s) == 19  # the dead one never finishes; the slow one does
    assert outcome.egress_bytes <= 1.3 * feed.bytes


def test_fan_out_spreads_the_uploads_of_hot_chunks(feed) -> None:
    """One owner per chunk (fanout 0) uploads each of its chunks to all 39 others; trees of 4 do not."""
    star = clock.run(run_scenario(feed, PeerConfig(fanout=STAR), Shape(), Scenario(40)))
    tree = clock.run(run_scenario(feed, PeerConfig(fanout=4), Shape(), Scenario(40)))
    assert star.complete and tree.complete
    assert max(tree.uploads) < 0.6 * max(star.uploads)
    assert max(tree.ready_s) < max(star.ready_s)  # virtual seconds: the owner's uplink no longer decides


def test_chunk_trees_climb_and_bound_each_nodes_children() -> None:
    members = [f"n{i}" for i in range(50)]
    ring = Ring.of(members)
    assert Ring.of(reversed(members)) is ring  # one object per member set: rankings are shared
    for digest in DIGESTS[:20]:
        order = ranked(digest, members)
        children: dict[str, int] = {}
        for member in members:
            chain = ring.ancestors(digest, member, 4)
            positions = [order.index(m) for m in chain]
            assert positions == sorted(positions, reverse=True)  # strictly up to the first-ranked
            assert all(p < order.index(member) for p in positions)
            assert (chain[-1] if chain else member) == order[0]
            if chain:
                children[chain[0]] = children.get(chain[0], 0) + 1
        assert max(children.values()) <= 4
        assert ring.ancestors(digest, order[7], STAR) == [order[0]]  # the old rule: the owner alone


class _Silent:
    """Membership's client: the tests feed members straight in."""


def _membership(node_id: str, others: list[str], now: clock.VirtualClock) -> Membership:
    membership = Membership(node_id, _Silent(), 1.0, 30.0, fanout=2, clock=now)  # type: ignore[arg-type]
    membership.begin_round()
    for other in others:
        membership.heard(other, {"node_id": other})
    return membership


def test_a_skipped_member_leaves_the_chunk_trees() -> None:
    now = clock.VirtualClock()
    members = [f"n{i}" for i in range(12)]
    digest = next(d for d in DIGESTS if ranked(d, members)[-1] == "n0")  # n0 at the bottom of the tree
    membership = _membership("n0", members[1:], now)
    before = [m.node_id for m in membership.upstream_for(digest)]
    parent = membership.upstream_for(digest)[0]
    membership.failed(parent, "timeout")
    after = [m.node_id for m in membership.upstream_for(digest)]
    assert parent.node_id not in after and parent not in membership.candidates_for(digest)
    rest = [m for m in members if m != parent.node_id]
    assert after == Ring.of(rest).ancestors(digest, "n0", 2)[:2] != before  # the tree without it
    now.now += 31  # the skip is over: at the next health round it is back in the trees
    membership.begin_round()
    for other in members[1:]:
        membership.heard(other, {"node_id": other})
    assert [m.node_id for m in membership.upstream_for(digest)] == before


def _ref(digest: str = DIGESTS[0]) -> ChunkRef:
    return ChunkRef(digest, 1000, "registry.sim/app", DIGESTS[1], 0, 500)


def _sources(hedge_after_s: float = 0.5) -> tuple[PeerSources[str], Membership, list[Member], clock.VirtualClock]:
    """Sources over three members; run the test's coroutine with clock.run(main(), now)."""
    now = clock.VirtualClock()
    membership = _membership("me", ["a", "b", "c"], now)
    sources: PeerSources[str] = PeerSources(membership, hedge_after_s, clock=now)
    members = {m.node_id: m for m in membership.alive()}
    return sources, membership, [members["a"], members["b"], members["c"]], now


def test_a_failed_source_is_skipped_and_the_next_asked_at_once() -> None:
    sources, membership, (a, b, _), now = _sources()
    asked: list[str] = []

    async def attempt(member: Member, ref: ChunkRef) -> str:
        asked.append(member.node_id)
        if member is a:
            raise PeerFetchError("refused", "refused")
        return f"from {member.node_id}"

    async def main() -> tuple[str, float]:
        answer, member = await sources.fetch(_ref(), [a, b], attempt)
        return answer, asyncio.get_running_loop().time()

    (answer, at) = clock.run(main(), now)
    assert answer == "from b" and asked == ["a", "b"] and at == 0.0
    assert a.skip_until > 0 and sources.hedges == 0


def test_every_source_failing_is_source_exhausted() -> None:
    sources, _, (a, b, _), now = _sources()

    async def attempt(member: Member, ref: ChunkRef) -> str:
        raise PeerFetchError("timed out", "timeout")

    with pytest.raises(SourceExhausted):
        clock.run(sources.fetch(_ref(), [a, b], attempt), now)


def test_a_busy_healthy_source_is_not_hedged() -> None:
    """Answers that all take long (a busy cold start) raise the deadline instead of hedging: only
    the very first request, with nothing learnt yet, may be hedged after SLOW_FACTOR deadlines."""
    sources, _, (a, b, _), now = _sources()

    async def attempt(member: Member, ref: ChunkRef) -> str:
        await asyncio.sleep(2.0)  # 4× the floor: past the deadline, but it is everyone's time
        return member.node_id

    async def main() -> list[str]:
        return [(await sources.fetch(_ref(d), [a, b], attempt))[0] for d in DIGESTS[:5]]

    assert clock.run(main(), now) == ["a"] * 5
    assert sources.hedges <= 1


def test_a_slow_source_is_hedged_then_skipped() -> None:
    """A source answering many times slower than the others is suspect: after the deadline the next
    one is asked too, the first answer wins, and a source that keeps losing is skipped as slow."""
    sources, membership, (a, b, c), now = _sources()

    async def attempt(member: Member, ref: ChunkRef) -> str:
        await asyncio.sleep(30.0 if member is a else 0.1)
        return member.node_id

    async def main() -> list[tuple[str, float]]:
        out = []
        for digest in DIGESTS[:SLOW_STRIKES + 1]:
            started = asyncio.get_running_loop().time()
            answer, _ = await sources.fetch(_ref(digest), [a, b], attempt)
            out.append((answer, asyncio.get_running_loop().time() - started))
        return out

    results = clock.run(main(), now)
    assert all(answer == "b" for answer, _ in results)
    assert all(took < 30.0 for _, took in results)  # never waited for the slow one's answer
    assert sources.hedges >= SLOW_STRIKES
    assert a.skip_until > 0  # skipped as slow: out of the candidates and the trees
    assert a not in membership.candidates_for(DIGESTS[0])


def test_holders_least_loaded_first() -> None:
    sources, _, (a, b, c), _ = _sources()

    class Holds:
        def might_hold(self, digest: str) -> bool:
            return True

    a.holds = b.holds = Holds()  # type: ignore[assignment]
    sources._outstanding["a"] = 3
    assert [m.node_id for m in sources.order(DIGESTS[0], [c, a, b])] == ["b", "a", "c"]


def _layout_with_one_layer(root: Path) -> tuple[Path, str, list[int]]:
    """An OCI layout holding one converted peerpull layer (a tar of a few files)."""
    import hashlib
    import io
    import json
    import os
    import tarfile

    from converter.conversion.layer_writer import write_seekable_layer

    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w") as archive:
        for i in range(6):
            data = os.urandom(300_000 + 1000 * i)
            info = tarfile.TarInfo(f"app/file{i}.bin")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    out = io.BytesIO()
    result = write_seekable_layer(io.BytesIO(tar.getvalue()), out, chunk_size=256 << 10)
    (blobs / result.digest.removeprefix("sha256:")).write_bytes(out.getvalue())

    def put(doc: dict) -> str:
        raw = json.dumps(doc).encode()
        digest = hashlib.sha256(raw).hexdigest()
        (blobs / digest).write_bytes(raw)
        return f"sha256:{digest}"

    manifest = put({"schemaVersion": 2, "layers": [{"digest": result.digest, "size": result.size}]})
    (root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [{"digest": manifest}]}))
    assert result.toc is not None
    offsets = sorted({c.blob_offset for e in result.toc.entries for c in e.chunks})
    return root, result.digest, offsets


def _profile(path: Path, layer: str, offsets: list[int]) -> Path:
    import json

    path.write_text(json.dumps({"version": 1, "manifest_digest": "sha256:" + "0" * 64, "layers": [layer],
                                "reads": [[0, offset] for offset in offsets]}))
    return path


def test_a_real_toc_and_profile_feed_the_simulation_in_the_profiles_order(tmp_path: Path) -> None:
    from sim.feed import from_layout
    from sim.feed_files import NO_PROFILE

    layout, layer, offsets = _layout_with_one_layer(tmp_path / "layout")
    whole = from_layout(layout)
    assert [r.blob_offset for r in whole.refs] == offsets and NO_PROFILE in whole.source
    # a repeat and a bogus offset are dropped; the rest keep the profile's (not the blob's) order
    order = [offsets[5], offsets[1], offsets[7], offsets[0], offsets[3]]
    profile = _profile(tmp_path / "profile.json", layer, [*order, offsets[1], 12345])
    feed = from_layout(layout, profile)
    assert [r.blob_offset for r in feed.refs] == order and "with profile" in feed.source
    # one node streams it in that order (one stream slot, no merged Range requests: arrival order is read order)
    alone = clock.run(run_scenario(feed, PeerConfig(stream_parallel=1, coalesce_max_bytes=64 << 10), Shape(),
                                   Scenario(1)))
    assert list(alone.first_arrivals) == [r.digest for r in feed.refs]
    outcome = clock.run(run_scenario(feed, PeerConfig(), Shape(), Scenario(8)))
    assert outcome.complete and outcome.unfinished == 0 and len(outcome.ready_s) == 8
    assert outcome.egress_bytes == feed.bytes  # each frame of the working set left the registry once


def test_a_saved_feed_reads_back_as_the_same_working_set(tmp_path: Path) -> None:
    from sim.feed import from_layout
    from sim.feed_files import NO_PROFILE, from_saved, save_toc

    layout, layer, offsets = _layout_with_one_layer(tmp_path / "layout")
    saved = tmp_path / "feed"
    saved.mkdir()
    save_toc(saved / "toc.json", "test", "sha256:" + "0" * 64, from_layout(layout).refs)
    assert NO_PROFILE in from_saved(saved).source  # no profile.json: every frame, and it says so
    assert from_saved(saved).refs == from_layout(layout).refs
    _profile(saved / "profile.json", layer, [offsets[4], offsets[2]])
    feed = from_saved(saved)
    assert [r.blob_offset for r in feed.refs] == [offsets[4], offsets[2]] and "with profile" in feed.source
    assert [r.digest for r in feed.refs] == [r.digest for r in from_layout(layout, saved / "profile.json").refs]


def test_bench_simulate_writes_its_records(tmp_path: Path) -> None:
    import json
    import subprocess

    bench = Path(__file__).resolve().parent.parent / "bench" / "simulate"
    out = tmp_path / "sim.json"
    run = subprocess.run([str(bench), "--nodes", "3,12", "--working-set-mib", "2", "--json", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "synthetic TOC and profile" in run.stdout  # says which feed it used
    records = json.loads(out.read_text())
    assert [r["nodes"] for r in records] == [3, 12]
    for key in ("egress_ratio", "p50_s", "p99_s", "single_node_s", "max_upload_ratio", "churn_egress_ratio"):
        assert all(isinstance(r[key], float) for r in records)
    assert records[0]["churn_events"] == 0 and records[1]["churn_events"] == 2  # 5 %: none of 3, one each of 12
    assert records[0]["churn_egress_ratio"] == records[0]["egress_ratio"] and records[1]["churn_egress_ratio"] >= 1.0
    assert "faults_egress_ratio" in records[1] and "faults_egress_ratio" not in records[0]  # from N=10
    bad = subprocess.run([str(bench), "--nodes", "ten"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--nodes" in bad.stderr


def test_calibration_simulates_the_real_runs_nodes_links_and_image(tmp_path: Path) -> None:
    """A `bench/cluster --json` file names its N, its tc rates and the feed it saved: the simulation
    takes all three and prints each beside the real figures."""
    import json
    import subprocess

    from sim.feed import from_layout
    from sim.feed_files import save_toc

    layout, _, _ = _layout_with_one_layer(tmp_path / "layout")
    saved = tmp_path / "feed"
    saved.mkdir()
    save_toc(saved / "toc.json", "test", "sha256:" + "0" * 64, from_layout(layout).refs)
    real = tmp_path / "cluster.json"
    common = {"rate_bytes_per_s": 1e6, "registry_rate_bytes_per_s": 2e6, "feed": str(saved)}
    real.write_text(json.dumps([
        {"mode": "cold", "nodes": 1, "egress_ratio": 1.0, "p50_ready_s": 3.5, "max_ready_s": 3.5, **common},
        {"mode": "cold", "nodes": 3, "egress_ratio": 1.02, "p50_ready_s": 9.5, "max_ready_s": 11.0,
         "max_upload_ratio": 0.777, **common},
        {"mode": "warm", "nodes": 3, "egress_ratio": 1.0, "p50_ready_s": 1.0, "max_ready_s": 1.0, **common}]))
    bench = Path(__file__).resolve().parent.parent / "bench" / "simulate"
    run = subprocess.run([str(bench), "--calibrate-only", "--calibrate-json", str(real), "--working-set-mib", "1"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert any(f"TOC {saved}/toc.json" in line and "8 Mbit/s nodes, 16 Mbit/s registry" in line for line in lines)
    rows = [line.split() for line in lines if line.split()[:2] in (["1", "sim"], ["1", "real"], ["3", "sim"],
                                                                     ["3", "real"])]
    assert [r[:2] for r in rows] == [["1", "sim"], ["1", "real"], ["3", "sim"], ["3", "real"]]  # no warm record
    assert rows[3][2:] == ["1.020", "9.500", "11.000", "0.777"]
    ws = from_layout(layout).bytes
    assert rows[0][2] == "1.000" and float(rows[0][3]) >= ws / 1e6  # one node: the working set over 1 MB/s
    assert rows[2][2] == "1.000" and 0 < float(rows[2][5]) < 3  # three nodes: the registry sent it once
    assert "models the network only" in run.stdout


def test_a_source_with_a_low_byte_rate_is_suspect_even_when_everyone_is_slow() -> None:
    """Under a saturated start every answer takes seconds; what sets a slow uplink apart is bytes
    per busy second. `b` answers each request in 2 s, in parallel; `a` one request at a time,
    2 s each: after a while `a` delivers far fewer bytes per second and is hedged at once."""
    sources, _, (a, b, c), now = _sources()
    serial = asyncio.Lock()

    async def attempt(member: Member, ref: ChunkRef) -> str:
        if member is a:
            async with serial:
                await asyncio.sleep(2.0)
        else:
            await asyncio.sleep(2.0)
        return member.node_id

    async def main() -> tuple[list[str], list[str]]:
        # warm-up: 12 at once to a (as first source) and 12 at once to b
        first = await asyncio.gather(*(sources.fetch(_ref(d), [b], attempt) for d in DIGESTS[:12]),
                                     *(sources.fetch(_ref(d), [a, c], attempt) for d in DIGESTS[12:24]))
        then = await asyncio.gather(*(sources.fetch(_ref(d), [a, c], attempt) for d in DIGESTS[24:30]))
        return [m for m, _ in first], [m for m, _ in then]

    first, then = clock.run(main(), now)
    assert sources.suspect(a) and not sources.suspect(b)
    assert then.count("c") > then.count("a")  # most hedged to c rather than queued behind a




def test_a_source_seven_times_slower_than_the_others_is_suspect() -> None:
    """Bytes per busy second: `a` delivered 12 kB in 24 busy seconds (500 B/s), `b` and `c` 43 kB
    each in 2 s; all sources together 3,500 B/s. Under the old threshold (9×: 389 B/s) `a` passed
    as healthy; with the real torch feed such a peer held p99 at 2× one node alone."""
    from peer.sources import RATE_FACTOR

    sources, _, (a, b, c), _ = _sources()
    sources._delivered.update(a=12_000, b=43_000, c=43_000)
    sources._busy_s.update(a=24.0, b=2.0, c=2.0)
    sources._answer_s, sources._answers = 2.0, 100  # answer times alike: only the rate tells
    assert RATE_FACTOR < 7
    assert sources.suspect(a) and not sources.suspect(b) and not sources.suspect(c)
