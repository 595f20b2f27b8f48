"""Merkle hashing, stored-hash addressing, proofs and their verifiers (valise.tlog.merkle)."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from valise import tlog
from valise.errors import ProofError
from valise.tlog import merkle

# RFC 6962 8-leaf test tree. Source: github.com/transparency-dev/merkle testonly/constants.go (the same values are
# in google/trillian merkle/testonly/constants.go); leaf 0 is the empty string.
LEAVES = [bytes.fromhex(h) for h in ["", "00", "10", "2021", "3031", "40414243", "5051525354555657",
                                      "606162636465666768696a6b6c6d6e6f"]]  # fmt: skip
ROOTS = {
    0: "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    1: "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    2: "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    3: "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    4: "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    5: "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    6: "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    7: "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    8: "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
}
# Published proofs over that tree. Source: transparency-dev/merkle proof/verify_test.go @ eb3bd591 (inclusion
# indexes converted there from 1-based); hashes lowest level first.
H = {
    "l0_0": "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "l0_1": "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
    "l0_4": "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
    "l0_6": "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
    "l1_0": "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "l1_1": "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
    "l1_2": "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
    "l1_3": "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
    "l2_0": "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "l2_1": "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
}
INCLUSION = {
    (0, 1): [],
    (0, 8): ["l0_1", "l1_1", "l2_1"],
    (5, 8): ["l0_4", "l1_3", "l2_0"],
    (2, 3): ["l1_0"],
    (1, 5): ["l0_0", "l1_1", "l0_4"],
}
CONSISTENCY = {
    (1, 1): [],
    (1, 8): ["l0_1", "l1_1", "l2_1"],
    (6, 8): ["l1_2", "l1_3", "l2_0"],
    (2, 5): ["l1_1", "l0_4"],
    (6, 7): ["l1_2", "l0_6", "l2_0"],
}


def build(n: int) -> merkle.MemoryHashes:
    store = merkle.MemoryHashes()
    for i in range(n):
        store.append(merkle.hash_leaf(b"leaf %d" % i))
    return store


def reference_root(leaves: list[bytes]) -> bytes:
    """RFC 6962 §2.1 MTH, written literally (recursive split at the largest power of two below n)."""
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return leaves[0]
    k = 1 << ((len(leaves) - 1).bit_length() - 1)
    return merkle.hash_children(reference_root(leaves[:k]), reference_root(leaves[k:]))


@pytest.fixture(scope="module")
def eight() -> merkle.MemoryHashes:
    store = merkle.MemoryHashes()
    for d in LEAVES:
        store.append(merkle.hash_leaf(d))
    return store


def test_hasher_known_answers() -> None:
    # Source: transparency-dev/merkle rfc6962/rfc6962_test.go.
    assert merkle.EMPTY_ROOT.hex() == ROOTS[0]
    assert merkle.hash_leaf(b"").hex() == ROOTS[1]
    assert merkle.hash_leaf(b"L123456").hex() == "395aa064aa4c29f7010acfe3f25db9485bbd4b91897b6ad7ad547639252b4d56"
    want = "aa217fe888e47007fa15edab33c2b492a722cb106c64667fc2b044444de66bbb"
    assert merkle.hash_children(b"N123", b"N456").hex() == want


def test_roots_of_the_eight_leaf_tree(eight: merkle.MemoryHashes) -> None:
    for n, root in ROOTS.items():
        assert merkle.tree_hash(n, eight).hex() == root
        assert merkle.root_from_leaf_hashes([merkle.hash_leaf(d) for d in LEAVES[:n]]).hex() == root


def test_stored_hashes_are_the_complete_subtrees(eight: merkle.MemoryHashes) -> None:
    assert len(eight.hashes) == merkle.stored_hash_count(8) == 15
    assert eight.hashes[merkle.stored_hash_index(1, 1)].hex() == H["l1_1"]
    assert eight.hashes[merkle.stored_hash_index(2, 1)].hex() == H["l2_1"]
    assert eight.hashes[merkle.stored_hash_index(3, 0)].hex() == ROOTS[8]
    assert eight.hashes[merkle.stored_hash_index(0, 6)].hex() == H["l0_6"]


def test_stored_hash_index_round_trips() -> None:
    # golang.org/x/mod/sumdb/tlog layout: leaf 0, leaf 1, (1,0), leaf 2, leaf 3, (1,1), (2,0), leaf 4, ...
    assert [merkle.split_stored_hash_index(i) for i in range(8)] == [
        (0, 0), (0, 1), (1, 0), (0, 2), (0, 3), (1, 1), (2, 0), (0, 4)]  # fmt: skip
    for i in range(5000):
        level, n = merkle.split_stored_hash_index(i)
        assert merkle.stored_hash_index(level, n) == i
    store = merkle.MemoryHashes()
    for size in range(300):
        assert merkle.stored_hash_count(size) == len(store.hashes)
        store.append(merkle.hash_leaf(b"%d" % size))


@pytest.mark.parametrize(("index", "size"), sorted(INCLUSION))
def test_published_inclusion_proofs(eight: merkle.MemoryHashes, index: int, size: int) -> None:
    proof = [bytes.fromhex(H[k]) for k in INCLUSION[index, size]]
    assert merkle.inclusion_proof(index, size, eight) == proof
    tlog.verify_inclusion(merkle.hash_leaf(LEAVES[index]), index, size, proof, bytes.fromhex(ROOTS[size]))


@pytest.mark.parametrize(("size1", "size2"), sorted(CONSISTENCY))
def test_published_consistency_proofs(eight: merkle.MemoryHashes, size1: int, size2: int) -> None:
    proof = [bytes.fromhex(H[k]) for k in CONSISTENCY[size1, size2]]
    assert merkle.consistency_proof(size1, size2, eight) == proof
    tlog.verify_consistency(size1, size2, proof, bytes.fromhex(ROOTS[size1]), bytes.fromhex(ROOTS[size2]))


def test_every_proof_in_small_trees_matches_the_reference() -> None:
    store = build(40)
    leaves = [merkle.hash_leaf(b"leaf %d" % i) for i in range(40)]
    roots = [reference_root(leaves[:n]) for n in range(41)]
    for size in range(41):
        assert merkle.tree_hash(size, store) == roots[size]
        for index in range(size):
            proof = merkle.inclusion_proof(index, size, store)
            merkle.verify_inclusion(leaves[index], index, size, proof, roots[size])
        for size1 in range(size + 1):
            proof = merkle.consistency_proof(size1, size, store)
            merkle.verify_consistency(size1, size, proof, roots[size1], roots[size])


def test_size_zero_consistency_is_the_empty_proof() -> None:
    store = build(5)
    root5 = merkle.tree_hash(5, store)
    assert merkle.consistency_proof(0, 5, store) == []
    merkle.verify_consistency(0, 5, [], merkle.EMPTY_ROOT, root5)
    with pytest.raises(ProofError, match="expected 0"):
        merkle.verify_consistency(0, 5, [root5], merkle.EMPTY_ROOT, root5)
    with pytest.raises(ProofError, match="empty tree"):
        merkle.verify_consistency(0, 5, [], root5, root5)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((b"\x00" * 32, 3, 3, [], b"\x00" * 32), "not below tree size"),
        ((b"\x00" * 32, -1, 3, [], b"\x00" * 32), "not below tree size"),
        ((b"\x00" * 31, 0, 1, [], b"\x00" * 32), "leaf hash is 31 bytes"),
        ((b"\x00" * 32, 0, 1, [], b"\x00" * 33), "root hash is 33 bytes"),
        ((b"\x00" * 32, 0, 2, [], b"\x00" * 32), "proof has 0 hashes, expected 1"),
        ((b"\x00" * 32, 0, 2, [b"\x00" * 32] * 2, b"\x00" * 32), "proof has 2 hashes, expected 1"),
        ((b"\x00" * 32, 0, 2, [b"\x00" * 31], b"\x00" * 32), "proof hash 0 is 31 bytes"),
        ((b"\x00" * 32, 0, 2**64, [], b"\x00" * 32), "tree size"),
    ],
)
def test_inclusion_refusals_say_why(args: tuple[bytes, int, int, list[bytes], bytes], message: str) -> None:
    with pytest.raises(ProofError, match=message):
        tlog.verify_inclusion(*args)


def test_consistency_refusals_say_why() -> None:
    store = build(9)
    r4, r6, r9 = merkle.tree_hash(4, store), merkle.tree_hash(6, store), merkle.tree_hash(9, store)
    proof = merkle.consistency_proof(4, 9, store)
    with pytest.raises(ProofError, match="larger than"):
        tlog.verify_consistency(9, 4, proof, r9, r4)
    with pytest.raises(ProofError, match="old root"):
        tlog.verify_consistency(6, 9, merkle.consistency_proof(6, 9, store), r9, r9)
    with pytest.raises(ProofError, match="new root"):  # size1 = 2^k: root1 seeds both chains, so it shows here
        tlog.verify_consistency(4, 9, proof, r6, r9)
    with pytest.raises(ProofError, match="new root"):
        tlog.verify_consistency(4, 9, proof, r4, r4)
    with pytest.raises(ProofError, match="expected"):
        tlog.verify_consistency(4, 9, [*proof, proof[0]], r4, r9)
    with pytest.raises(ProofError, match="different root"):
        tlog.verify_consistency(4, 4, [], r4, r9)
    with pytest.raises(ProofError, match="not below"):
        merkle.inclusion_proof(9, 9, store)


# --- properties ---------------------------------------------------------------------------------------

BIG = build(300)
BIG_LEAVES = [merkle.hash_leaf(b"leaf %d" % i) for i in range(300)]


def _mutations(proof: list[bytes], pick: int) -> list[list[bytes]]:
    """Every kind of damage a proof can suffer: a flipped bit in each hash, a dropped, added or swapped hash."""
    out: list[list[bytes]] = []
    for i, h in enumerate(proof):
        bit = pick % (8 * len(h))
        flipped = bytearray(h)
        flipped[bit // 8] ^= 1 << (bit % 8)
        out.append([*proof[:i], bytes(flipped), *proof[i + 1 :]])
        out.append(proof[:i] + proof[i + 1 :])
    out.append([*proof, proof[-1] if proof else b"\x00" * 32])
    out.append([b"\x00" * 32, *proof])
    if len(proof) > 1 and proof[0] != proof[1]:
        out.append([proof[1], proof[0], *proof[2:]])
    return out


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 300).flatmap(lambda n: st.tuples(st.integers(0, n - 1), st.just(n))), st.integers(0, 10**6))
def test_inclusion_proofs_verify_and_mutations_fail(case: tuple[int, int], pick: int) -> None:
    index, size = case
    root = merkle.tree_hash(size, BIG)
    proof = merkle.inclusion_proof(index, size, BIG)
    merkle.verify_inclusion(BIG_LEAVES[index], index, size, proof, root)
    for bad in _mutations(proof, pick):
        with pytest.raises(ProofError):
            merkle.verify_inclusion(BIG_LEAVES[index], index, size, bad, root)
    # (A changed size alone may keep the path's shape and so still verify: the root is bound to its size by the
    # signed checkpoint, not by the proof.)
    for other in {index ^ 1, index + 1, index - 1} - {index}:
        with pytest.raises(ProofError):
            merkle.verify_inclusion(BIG_LEAVES[index], other, size, proof, root)
    with pytest.raises(ProofError):
        merkle.verify_inclusion(BIG_LEAVES[(index + 1) % 300], index, size, proof, root)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 300).flatmap(lambda n: st.tuples(st.integers(1, n), st.just(n))), st.integers(0, 10**6))
def test_consistency_proofs_verify_and_mutations_fail(case: tuple[int, int], pick: int) -> None:
    size1, size2 = case
    root1, root2 = merkle.tree_hash(size1, BIG), merkle.tree_hash(size2, BIG)
    proof = merkle.consistency_proof(size1, size2, BIG)
    merkle.verify_consistency(size1, size2, proof, root1, root2)
    for bad in _mutations(proof, pick):
        with pytest.raises(ProofError):
            merkle.verify_consistency(size1, size2, bad, root1, root2)
    if size1 != size2:
        with pytest.raises(ProofError):
            merkle.verify_consistency(size1, size2, proof, root2, root1)
    if 1 < size1 < size2:
        with pytest.raises(ProofError):
            merkle.verify_consistency(size1 - 1, size2, proof, merkle.tree_hash(size1 - 1, BIG), root2)


def test_a_compact_range_resumes_from_its_saved_state() -> None:
    leaves = [merkle.hash_leaf(bytes([i])) for i in range(13)]
    r = merkle.CompactRange()
    r.extend(leaves[:7])
    resumed = merkle.CompactRange.resume(*r.state())
    resumed.extend(leaves[7:])
    assert resumed.root() == merkle.root_from_leaf_hashes(leaves)
    size, stack = r.state()
    with pytest.raises(ProofError, match="cannot have"):
        merkle.CompactRange.resume(size + 1, stack)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 300), st.integers(0, 300))
def test_aligned_subtrees_cover_a_range_and_fold_into_its_root(a: int, b: int) -> None:
    """A run of leaves given as stored complete-subtree hashes folds into a compact range like the leaves one by
    one would: how a member follows the log without a hash per entry it may not read."""
    start, end = min(a, b), max(a, b)
    store = build(end)
    leaves = [merkle.hash_leaf(b"leaf %d" % i) for i in range(end)]
    subtrees = merkle.aligned_subtrees(start, end)
    position = start
    for level, n in subtrees:
        assert n << level == position  # contiguous, left to right, each aligned at its own size
        position += 1 << level
    assert position == end
    assert len(subtrees) <= 2 * max(1, (end - start).bit_length())
    r = merkle.CompactRange()
    r.extend(leaves[:start])
    hashes = store.read_hashes([merkle.stored_hash_index(level, n) for level, n in subtrees])
    for (level, _), h in zip(subtrees, hashes, strict=True):
        r.append_subtree(h, level)
    assert r.size == end
    assert r.root() == reference_root(leaves)


def test_a_subtree_that_does_not_start_at_its_own_alignment_is_refused() -> None:
    r = merkle.CompactRange()
    r.extend([merkle.hash_leaf(b"x")] * 3)
    with pytest.raises(ProofError, match="cannot start after 3 leaves"):
        r.append_subtree(bytes(32), 1)
    with pytest.raises(ProofError, match="subtree hash is 31 bytes"):
        r.append_subtree(bytes(31), 0)
    with pytest.raises(ProofError, match="cannot start"):
        r.append_subtree(bytes(32), merkle.MAX_LEVEL + 1)
    r.append_subtree(bytes(32), 0)
    r.append_subtree(bytes(32), 2)
    assert r.size == 8
    with pytest.raises(ProofError, match="not a range"):
        merkle.aligned_subtrees(5, 4)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 200), st.integers(0, 200), st.sets(st.integers(0, 199)), st.integers(1, 20))
def test_covering_shows_what_may_be_read_and_hashes_the_rest(a: int, b: int, shown: set[int], limit: int) -> None:
    start, end = min(a, b), max(a, b)
    readable = sorted(i for i in shown if start <= i < end)
    items = merkle.covering(start, end, readable, limit)
    assert len(items) <= limit
    position = start
    for at, level in items:
        assert at == position
        if level is None:
            assert at in readable
            position += 1
        else:
            assert at % (1 << level) == 0
            assert not any(at <= r < at + (1 << level) for r in readable)  # nothing readable is hidden
            position += 1 << level
    assert position <= end
    if len(items) < limit:
        assert position == end  # only the limit cuts an answer short
    with pytest.raises(ProofError, match="not ascending"):
        merkle.covering(start, end, [end + 1], limit)
