"""The replica routing policy without Ray (routing.py), and the plain server's freedom from Ray."""
import subprocess
import sys

from tuili.serve.replicas.routing import CacheAwarePolicy, PrefixIndex, RouteKey, block_hashes


def key(ids, session=None):
    return RouteKey(block_hashes(ids, 4), 4, session)


def test_block_hashes_are_chained_and_cover_full_blocks_only():
    a = block_hashes(list(range(10)), 4)
    b = block_hashes(list(range(8)) + [99, 98], 4)
    assert len(a) == 2 and a == b
    c = block_hashes([1, 2, 3, 4, 5, 6, 7, 8], 4)
    d = block_hashes([0, 2, 3, 4, 5, 6, 7, 8], 4)
    assert c[1] != d[1]  # the second block's hash depends on the first


def test_prefix_wins_least_loaded_breaks_new_prefixes_and_imbalance_spreads():
    p = CacheAwarePolicy(load_cost=8, imbalance=3)
    reps = ["A", "B"]
    one, two = list(range(40)), list(range(100, 140))
    first = p.choose(key(one), reps, {"A": 0, "B": 0})
    assert first.reason == "least-loaded"
    p.routed(key(one), first.replica)
    again = p.choose(key(one + [7, 7, 7, 7]), reps, {"A": 1, "B": 1})
    assert again.replica == first.replica and again.reason == "prefix" and again.matched_blocks == 10
    other = "B" if first.replica == "A" else "A"
    new = p.choose(key(two), reps, {first.replica: 1, other: 0})
    assert new.replica == other and new.reason == "least-loaded"
    # held tokens minus load: 40 tokens held beat 2 more requests in flight (16 tokens)
    assert p.choose(key(one), reps, {first.replica: 3, other: 1}).replica == first.replica
    # out of balance: power of two choices, and with two replicas the less loaded one
    hot = p.choose(key(one), reps, {first.replica: 9, other: 0})
    assert hot.reason == "imbalance" and hot.replica == other


def test_sessions_stick_and_are_forgotten_with_their_replica():
    p = CacheAwarePolicy()
    p.routed(key([1] * 8, "s"), "B")
    assert p.choose(key([5] * 8, "s"), ["A", "B"], {"A": 0, "B": 2}).replica == "B"
    # ...unless another replica holds more of the prompt: the prefix wins over the session
    p.routed(key([9] * 16), "A")
    moved = p.choose(key([9] * 16, "s"), ["A", "B"], {"A": 0, "B": 0})
    assert (moved.replica, moved.reason) == ("A", "prefix")
    p.forget("B")
    c = p.choose(key([5] * 8, "s"), ["A", "C"], {})
    assert c.reason != "session"


def test_prefix_index_is_bounded_per_replica():
    idx = PrefixIndex()
    idx.set_capacity("A", 3)
    idx.add("A", [1, 2, 3, 4, 5])
    assert idx.match("A", [1, 2]) == 0 and idx.match("A", [3, 4, 5]) == 3


def test_plain_server_path_does_not_import_ray():
    code = ("import sys\nfrom tuili.cli import build_parser\nimport tuili.serve.launch, tuili.serve.app\n"
            "from tuili.serve.app import create_app\nfrom tuili.serve.models import ModelRegistry\n"
            "create_app(ModelRegistry())\n"
            "assert 'ray' not in sys.modules, [m for m in sys.modules if m.startswith('ray')]\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_tenants_workload_shares_a_long_prompt_per_tenant():
    import argparse

    from tuili.bench.tenants import requests

    args = argparse.Namespace(seed=0, num_requests=40, tenants=4, output_len=8, prompt_words=300)
    bodies = requests(args)
    systems = {b["messages"][0]["content"] for b in bodies}
    assert len(systems) == 4 and all(len(s.split()) > 300 for s in systems)
    assert len({b["user"] for b in bodies}) == 40 and requests(args) == bodies  # seeded
