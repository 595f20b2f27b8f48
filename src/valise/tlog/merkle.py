"""RFC 6962 / RFC 9162 Merkle tree hashing and proofs over stored hashes (pure: no I/O).

Interface for store authors (specs/log.md, "Hashing" and "Stored hashes")
-------------------------------------------------------------------------
Hashes are 32-byte SHA-256 digests: `hash_leaf(data)` = SHA-256(0x00 ‖ data) and
`hash_children(l, r)` = SHA-256(0x01 ‖ l ‖ r); the empty tree's root is `EMPTY_ROOT` = SHA-256("").

A store keeps one flat, append-only array of *stored hashes*, addressed as in golang.org/x/mod/sumdb/tlog:
the level-0 hash of every leaf, plus the interior hash of every *complete* subtree of 2^level leaves, each
written right after the leaf that completes it. `stored_hash_index(level, n)` is the position of the n-th
hash of that level. To append leaf `i` (leaves are appended in order, 0, 1, 2, ...):

    new = stored_hashes_for_leaf(i, hash_leaf(data), reader)   # reads at most log2(i) old hashes
    # write new[0], new[1], ... at positions stored_hash_index(0, i), stored_hash_index(0, i) + 1, ...
    # (equivalently: append them; stored_hash_count(i + 1) == stored_hash_index(0, i) + len(new))

A store then implements `HashReader.read_hashes(indexes)`, returning the stored hashes at those positions in
the order asked (it may raise valise.errors.StoreError), and gets, for any size it holds:
`tree_hash(size, reader)`, `inclusion_proof(index, size, reader)`, `consistency_proof(size1, size2, reader)`.
Each of these reads O(log size) hashes in ONE `read_hashes` call. A hash never changes once written, which
is what makes C2SP tlog-tiles (tiles.py) static files. `MemoryHashes` is the in-memory reference store.

Verifiers (`verify_inclusion`, `verify_consistency`) need no reader; they follow the RFC 9162 §2.1.3.2 and
§2.1.4.2 algorithms in the decomposed form of transparency-dev/merkle, check every length *before* hashing,
and raise valise.errors.ProofError naming what was wrong.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Protocol

from valise.errors import ProofError

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()

# Tree sizes are uint64 on the wire (checkpoints, proof bundles); nothing larger is meaningful.
MAX_TREE_SIZE = 2**63 - 1
MAX_LEVEL = 62  # the highest level of a complete subtree in a tree of at most MAX_TREE_SIZE leaves

_sha256 = hashlib.sha256


def hash_leaf(data: bytes) -> bytes:
    """RFC 6962 §2.1 leaf hash: SHA-256(0x00 ‖ data)."""
    return _sha256(b"\x00" + data).digest()


def hash_children(left: bytes, right: bytes) -> bytes:
    """RFC 6962 §2.1 interior node hash: SHA-256(0x01 ‖ left ‖ right)."""
    return _sha256(b"\x01" + left + right).digest()


class HashReader(Protocol):
    """Read stored hashes by stored-hash index (see `stored_hash_index`)."""

    def read_hashes(self, indexes: Sequence[int]) -> list[bytes]: ...


# --- stored-hash addressing (golang.org/x/mod/sumdb/tlog) ---------------------------------------------


def stored_hash_index(level: int, n: int) -> int:
    """Position of the n-th hash at `level` in the stored-hash array.

    Level L's n-th hash is written right after level 0's hash number (n+1)·2^L − 1 (the leaf completing it),
    and leaf m's hash sits after all hashes completed before it: m + m/2 + m/4 + ... of them.
    """
    m = ((n + 1) << level) - 1
    i = 0
    while m:
        i += m
        m >>= 1
    return i + level


def split_stored_hash_index(index: int) -> tuple[int, int]:
    """Inverse of `stored_hash_index`: the (level, n) stored at `index`."""
    # stored_hash_index(0, m) lies in [m, 2m], so the leaf written last before `index` is near index/2.
    m = index // 2
    at = stored_hash_index(0, m)
    while True:
        nxt = at + 1 + _trailing_ones(m)  # leaf m brings itself plus one hash per subtree it completes
        if nxt > index:
            break
        m += 1
        at = nxt
    level = index - at
    return level, m >> level


def stored_hash_count(size: int) -> int:
    """How many hashes a tree of `size` leaves stores."""
    if size == 0:
        return 0
    return stored_hash_index(0, size - 1) + 1 + _trailing_ones(size - 1)


def _trailing_ones(x: int) -> int:
    return ((x ^ (x + 1)).bit_length()) - 1


def stored_hashes_for_leaf(index: int, leaf_hash: bytes, reader: HashReader) -> list[bytes]:
    """The hashes to store when appending leaf `index`: its leaf hash, then one per subtree it completes."""
    _check_hash(leaf_hash, "leaf hash")
    if index < 0 or index >= MAX_TREE_SIZE:
        raise ProofError(f"leaf index {index} is out of range")
    m = _trailing_ones(index)
    if m == 0:
        return [leaf_hash]
    # The left siblings completed by this leaf, from the highest level down, so the reads are in stored order.
    old = reader.read_hashes([stored_hash_index(level, (index >> level) - 1) for level in range(m - 1, -1, -1)])
    _check_read(old, m)
    out = [leaf_hash]
    h = leaf_hash
    for left in reversed(old):
        h = _sha256(b"\x01" + left + h).digest()
        out.append(h)
    return out


# --- tree hashes and proofs over a HashReader ---------------------------------------------------------


def _subtree_indexes(lo: int, hi: int, need: list[int]) -> int:
    """Append the stored indexes whose fold is the hash of leaves [lo, hi); return how many were added.

    [lo, hi) splits into complete subtrees of decreasing size; each is one stored hash.
    """
    count = 0
    while lo < hi:
        level = (hi - lo).bit_length() - 1
        need.append(stored_hash_index(level, lo >> level))
        lo += 1 << level
        count += 1
    return count


def _fold(hashes: Sequence[bytes], start: int, count: int) -> bytes:
    """Hash of the complete subtrees hashes[start:start+count] (largest first): fold them from the right."""
    h = hashes[start + count - 1]
    for i in range(start + count - 2, start - 1, -1):
        h = _sha256(b"\x01" + hashes[i] + h).digest()
    return h


def tree_hash(size: int, reader: HashReader) -> bytes:
    """The root hash MTH(D[0:size]) of the first `size` leaves."""
    _check_size(size, "tree size")
    if size == 0:
        return EMPTY_ROOT
    need: list[int] = []
    count = _subtree_indexes(0, size, need)
    hashes = reader.read_hashes(need)
    _check_read(hashes, len(need))
    return _fold(hashes, 0, count)


def _read_segments(reader: HashReader, segments: list[tuple[int, int]], need: list[int]) -> list[bytes]:
    """Read `need` in one call and fold each (start, count) segment into one proof hash."""
    hashes = reader.read_hashes(need)
    _check_read(hashes, len(need))
    return [_fold(hashes, start, count) for start, count in segments]


def inclusion_proof(index: int, size: int, reader: HashReader) -> list[bytes]:
    """RFC 9162 §2.1.3.1 inclusion proof of leaf `index` in the tree of `size` leaves, lowest level first."""
    _check_size(size, "tree size")
    if not 0 <= index < size:
        raise ProofError(f"leaf index {index} is not below tree size {size}")
    # Walk from the root to the leaf; each step's sibling is one proof hash (top-down, reversed at the end).
    need: list[int] = []
    segments: list[tuple[int, int]] = []
    lo, hi = 0, size
    while hi - lo > 1:
        k = 1 << ((hi - lo - 1).bit_length() - 1)  # largest power of two below hi - lo
        start = len(need)
        if index < lo + k:
            segments.append((start, _subtree_indexes(lo + k, hi, need)))
            hi = lo + k
        else:
            level = k.bit_length() - 1
            need.append(stored_hash_index(level, lo >> level))
            segments.append((start, 1))
            lo += k
    proof = _read_segments(reader, segments, need)
    proof.reverse()
    return proof


def consistency_proof(size1: int, size2: int, reader: HashReader) -> list[bytes]:
    """RFC 9162 §2.1.4.1 consistency proof that the tree of `size1` leaves is a prefix of that of `size2`.

    Empty when size1 == size2, and (specs/log.md, "Proofs") empty when size1 == 0.
    """
    _check_size(size1, "old tree size")
    _check_size(size2, "new tree size")
    if size1 > size2:
        raise ProofError(f"old tree size {size1} is larger than new tree size {size2}")
    if size1 == 0 or size1 == size2:
        return []
    need: list[int] = []
    segments: list[tuple[int, int]] = []
    lo, hi = 0, size2
    # SUBPROOF(m, D[lo:hi], b) with b == (lo == 0): descend until the old tree is a complete left subtree.
    while size1 != hi:
        k = 1 << ((hi - lo - 1).bit_length() - 1)
        start = len(need)
        if size1 <= lo + k:
            segments.append((start, _subtree_indexes(lo + k, hi, need)))
            hi = lo + k
        else:
            level = k.bit_length() - 1
            need.append(stored_hash_index(level, lo >> level))
            segments.append((start, 1))
            lo += k
    if lo != 0:  # the old tree's last complete subtree [lo, size1) is itself part of the proof
        start = len(need)
        segments.append((start, _subtree_indexes(lo, hi, need)))
    proof = _read_segments(reader, segments, need)
    proof.reverse()
    return proof


# --- roots without a store -----------------------------------------------------------------------------


class CompactRange:
    """The root of a growing tree in O(log n) memory: one hash per complete subtree of the prefix so far.

    Appending is amortised two hashes per leaf; auditors use it to recompute a root from tiles or entries.
    """

    __slots__ = ("_stack", "size")

    def __init__(self) -> None:
        self.size = 0
        self._stack: list[bytes] = []

    def state(self) -> tuple[int, list[bytes]]:
        """(size, the complete-subtree hashes left to right): what must be saved to resume the range."""
        return self.size, list(self._stack)

    @classmethod
    def resume(cls, size: int, stack: Sequence[bytes]) -> CompactRange:
        """The range of `size` leaves saved by `state()`; refuses a stack that does not fit the size."""
        if size < 0 or len(stack) != bin(size).count("1") or any(len(h) != HASH_SIZE for h in stack):
            raise ProofError(f"a compact range of {size} leaves cannot have these {len(stack)} subtree hashes")
        r = cls()
        r.size = size
        r._stack = list(stack)
        return r

    def append(self, leaf_hash: bytes) -> None:
        _check_hash(leaf_hash, "leaf hash")
        self._push(leaf_hash)

    def extend(self, leaf_hashes: Iterable[bytes]) -> None:
        for h in leaf_hashes:
            if len(h) != HASH_SIZE:
                _check_hash(h, "leaf hash")
            self._push(h)

    def append_subtree(self, subtree_hash: bytes, level: int) -> None:
        """Append the root of a complete subtree of 2^level leaves (a stored hash). The range's size must be a
        multiple of 2^level: in a tree, such a subtree can only start there."""
        _check_hash(subtree_hash, "subtree hash")
        if not 0 <= level <= MAX_LEVEL or self.size & ((1 << level) - 1):
            raise ProofError(f"a complete subtree of 2^{level} leaves cannot start after {self.size} leaves")
        stack = self._stack
        h = subtree_hash
        n = self.size >> level
        while n & 1:  # as _push, one level up: each 1 bit left of `level` is a subtree this one pairs with
            h = _sha256(b"\x01" + stack.pop() + h).digest()
            n >>= 1
        stack.append(h)
        self.size += 1 << level

    def _push(self, h: bytes) -> None:
        stack = self._stack
        n = self.size
        while n & 1:  # each trailing 1 bit of the old size is a complete subtree this leaf now pairs with
            h = _sha256(b"\x01" + stack.pop() + h).digest()
            n >>= 1
        stack.append(h)
        self.size += 1

    def root(self) -> bytes:
        stack = self._stack
        if not stack:
            return EMPTY_ROOT
        h = stack[-1]
        for i in range(len(stack) - 2, -1, -1):
            h = _sha256(b"\x01" + stack[i] + h).digest()
        return h


def aligned_subtrees(start: int, end: int) -> list[tuple[int, int]]:
    """The complete subtrees that cover leaves [start, end) exactly, left to right, each as large as its position
    allows: (level, n) is the n-th subtree of 2^level leaves, i.e. leaves [n·2^level, (n+1)·2^level), whose root
    is the stored hash at `stored_hash_index(level, n)`. At most about 2·log2(end − start) of them."""
    if not 0 <= start <= end <= MAX_TREE_SIZE:
        raise ProofError(f"[{start}, {end}) is not a range of leaves")
    out: list[tuple[int, int]] = []
    while start < end:
        level = (start & -start).bit_length() - 1 if start else MAX_LEVEL
        while (1 << level) > end - start:
            level -= 1
        out.append((level, start >> level))
        start += 1 << level
    return out


def covering(start: int, end: int, shown: Iterable[int], limit: int) -> list[tuple[int, int | None]]:
    """How to stand for leaves [start, end) when only the leaves `shown` (ascending) may be given in full: at most
    `limit` items, left to right, each (position, None) for a leaf given in full or (position, level) for the
    stored root of the complete subtree of 2^level leaves that starts at `position` (`aligned_subtrees` of each
    run in between). The items cover a prefix of the range when `limit` runs out first."""
    out: list[tuple[int, int | None]] = []
    position = start
    for leaf in (*shown, end):
        if leaf < position or leaf > end:
            raise ProofError(f"leaf {leaf} to show is not ascending within [{start}, {end})")
        for level, n in aligned_subtrees(position, leaf):
            if len(out) >= limit:
                return out
            out.append((n << level, level))
        if leaf == end or len(out) >= limit:
            return out
        out.append((leaf, None))
        position = leaf + 1
    return out


def root_from_leaf_hashes(hashes: Sequence[bytes]) -> bytes:
    """MTH over the given leaf hashes (RFC 6962 §2.1)."""
    r = CompactRange()
    r.extend(hashes)
    return r.root()


class MemoryHashes:
    """The in-memory reference store of stored hashes (tests, tools, and the model for durable stores)."""

    __slots__ = ("hashes", "size")

    def __init__(self) -> None:
        self.hashes: list[bytes] = []
        self.size = 0

    def read_hashes(self, indexes: Sequence[int]) -> list[bytes]:
        stored = self.hashes
        limit = len(stored)
        for i in indexes:
            if not 0 <= i < limit:
                raise ProofError(f"stored hash {i} does not exist (the store holds {limit})")
        return [stored[i] for i in indexes]

    def append(self, leaf_hash: bytes) -> int:
        """Append one leaf hash; return its index."""
        index = self.size
        self.hashes.extend(stored_hashes_for_leaf(index, leaf_hash, self))
        self.size += 1
        return index


# --- verification (RFC 9162 §2.1.3.2, §2.1.4.2) --------------------------------------------------------


def _check_hash(h: bytes, what: str) -> None:
    if not isinstance(h, bytes | bytearray) or len(h) != HASH_SIZE:
        got = len(h) if isinstance(h, bytes | bytearray) else type(h).__name__
        raise ProofError(f"{what} is {got} bytes, expected {HASH_SIZE}")


def _check_size(size: int, what: str) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= MAX_TREE_SIZE:
        raise ProofError(f"{what} {size!r} is not an integer in [0, 2^63)")


def _check_read(hashes: Sequence[bytes], want: int) -> None:
    if len(hashes) != want:
        raise ProofError(f"hash reader returned {len(hashes)} hashes, expected {want}")


def _check_proof(proof: Sequence[bytes], want: int) -> None:
    if len(proof) != want:
        raise ProofError(f"proof has {len(proof)} hashes, expected {want}")
    for i, h in enumerate(proof):
        _check_hash(h, f"proof hash {i}")


def _decompose(index: int, size: int) -> tuple[int, int]:
    """Inclusion proof of `index` in `size` = `inner` hashes below the split from the last leaf's path, then
    `border` hashes of complete left subtrees on the right border (transparency-dev/merkle)."""
    inner = (index ^ (size - 1)).bit_length()
    border = (index >> inner).bit_count()
    return inner, border


def root_from_inclusion_proof(leaf_hash: bytes, index: int, size: int, proof: Sequence[bytes]) -> bytes:
    """The root that `proof` implies for `leaf_hash` at `index` in a tree of `size` leaves."""
    _check_size(size, "tree size")
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < size:
        raise ProofError(f"leaf index {index!r} is not below tree size {size}")
    _check_hash(leaf_hash, "leaf hash")
    inner, border = _decompose(index, size)
    _check_proof(proof, inner + border)
    h = bytes(leaf_hash)
    for i in range(inner):
        left, right = (proof[i], h) if (index >> i) & 1 else (h, proof[i])
        h = _sha256(b"\x01" + left + right).digest()
    for i in range(inner, inner + border):
        h = _sha256(b"\x01" + proof[i] + h).digest()
    return h


def verify_inclusion(leaf_hash: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes) -> None:
    """Check that `proof` shows `leaf_hash` at `index` in the tree of `size` leaves with root `root`."""
    _check_hash(root, "root hash")
    if root_from_inclusion_proof(leaf_hash, index, size, proof) != root:
        raise ProofError(f"inclusion proof of leaf {index} in tree size {size} does not lead to the root hash")


def verify_consistency(size1: int, size2: int, proof: Sequence[bytes], root1: bytes, root2: bytes) -> None:
    """Check that `proof` shows the tree (size1, root1) is a prefix of the tree (size2, root2).

    size1 == 0 holds only with an empty proof and root1 == EMPTY_ROOT (specs/log.md, "Proofs").
    """
    _check_size(size1, "old tree size")
    _check_size(size2, "new tree size")
    if size2 < size1:
        raise ProofError(f"old tree size {size1} is larger than new tree size {size2}")
    if size1 == size2:
        # Equal sizes: only equality matters, so (as in transparency-dev/merkle) the roots' length is not
        # checked here; checkpoints, the only source of roots, already hold exactly 32 bytes.
        _check_proof(proof, 0)
        if root1 != root2:
            raise ProofError(f"trees of equal size {size1} have different root hashes")
        return
    _check_hash(root1, "old root hash")
    _check_hash(root2, "new root hash")
    if size1 == 0:
        _check_proof(proof, 0)
        if root1 != EMPTY_ROOT:
            raise ProofError("old tree size is 0 but the old root hash is not the empty tree's hash")
        return
    inner, border = _decompose(size1 - 1, size2)
    shift = (size1 & -size1).bit_length() - 1  # trailing zeros: the old tree's last complete subtree height
    inner -= shift
    # The proof starts with the hash of that subtree, unless it is the whole old tree (size1 == 2^shift).
    if size1 == 1 << shift:
        _check_proof(proof, inner + border)
        seed, rest = bytes(root1), proof
    else:
        _check_proof(proof, 1 + inner + border)
        seed, rest = proof[0], proof[1:]
    mask = (size1 - 1) >> shift
    h1 = h2 = seed
    for i in range(inner):
        p = rest[i]
        if (mask >> i) & 1:
            h1 = _sha256(b"\x01" + p + h1).digest()
            h2 = _sha256(b"\x01" + p + h2).digest()
        else:  # a hash right of the old tree: only the new tree includes it
            h2 = _sha256(b"\x01" + h2 + p).digest()
    for i in range(inner, inner + border):
        p = rest[i]
        h1 = _sha256(b"\x01" + p + h1).digest()
        h2 = _sha256(b"\x01" + p + h2).digest()
    if h1 != root1:
        raise ProofError(f"consistency proof from size {size1} to {size2} does not lead to the old root hash")
    if h2 != root2:
        raise ProofError(f"consistency proof from size {size1} to {size2} does not lead to the new root hash")
