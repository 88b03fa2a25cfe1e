"""Exact and near-duplicate detection per (tenant, task), pure: the Faust agent keeps the state.

    content_hash(example)            -> "sha256:..." of the normalized prompt (system turns left out) and completion
    signature(example, num_perm)     -> MinHash values (JSON-safe ints) of its word 3-shingles
    index = NearDuplicateIndex(threshold=0.8, num_perm=64); index.add(id, sig, hash)
    index.query(sig) -> [ids]; index.exact_of(hash) -> id | None

MinHash/LSH comes from ``datasketch`` (maintained, the standard choice). The index is only a cache:
the signatures and content hashes live in one Faust table with a changelog (one changelog record
per example), and the agent rebuilds an index from them after a restart or a rebalance
(``NearDuplicateIndex.of``).

The index is bounded: it keeps the ``max_size`` newest examples it was given (the curation setting
``dedupe_max_per_task``); adding one more evicts the oldest, whose id ``add`` returns so that the agent
deletes its table entry too. A duplicate of an example older than the newest ``max_size`` is not caught.
"""

from __future__ import annotations

import hashlib
import json
import re
from functools import lru_cache
from typing import Any, Iterable, Mapping

from datasketch import LeanMinHash, MinHash, MinHashLSH

from adaptloop.schemas.contract import RejectCode
from adaptloop.streams.stages import rejection

DEFAULT_NUM_PERM = 64
#: datasketch 2 permutation scheme, named: stored signatures must be rebuilt with the one that made them.
SCHEME = "affine32"
_WORD = re.compile(r"\w+", re.UNICODE)


def normalized_text(example: Mapping[str, Any]) -> str:
    """The example's content for dedupe: non-system turns and the completion, casefolded, whitespace collapsed.

    System prompts are left out: every example of a task shares one, so it says nothing about duplication.
    """
    parts = [m["content"] for m in example["prompt_messages"] if m["role"] != "system"]
    parts.append(example["completion"])
    return "\n".join(" ".join(p.split()).casefold() for p in parts)


def content_hash(example: Mapping[str, Any]) -> str:
    return "sha256:" + hashlib.sha256(normalized_text(example).encode()).hexdigest()


def shingles(text: str, size: int = 3) -> set[str]:
    words = _WORD.findall(text)
    if len(words) < size:
        return {" ".join(words)} if words else {""}
    return {" ".join(words[i:i + size]) for i in range(len(words) - size + 1)}


@lru_cache(maxsize=4)
def _permutations(num_perm: int) -> Any:
    """Drawing the permutations is most of a fresh MinHash's cost; they depend on (num_perm, seed) only."""
    return MinHash(num_perm=num_perm, seed=1, scheme=SCHEME).permutations


def signature(example: Mapping[str, Any], num_perm: int = DEFAULT_NUM_PERM) -> list[int]:
    minhash = MinHash(num_perm=num_perm, seed=1, scheme=SCHEME, permutations=_permutations(num_perm))
    minhash.update_batch([s.encode() for s in shingles(normalized_text(example))])
    return minhash.hashvalues.tolist()  # Python ints, JSON-safe


def _minhash(values: list[int], num_perm: int) -> LeanMinHash:
    """A frozen MinHash of stored values (no permutations drawn: only comparing and LSH keys need it)."""
    if len(values) != num_perm:
        raise ValueError(f"a signature of {len(values)} values where {num_perm} were expected")
    return LeanMinHash(seed=1, hashvalues=values, scheme=SCHEME)


def jaccard(a: list[int], b: list[int]) -> float:
    """Estimated Jaccard similarity of two signatures."""
    return _minhash(a, len(a)).jaccard(_minhash(b, len(b)))


class NearDuplicateIndex:
    """LSH over MinHash signatures of the newest ``max_size`` examples of one (tenant, task); ``query`` confirms
    candidates by estimated Jaccard. ``exact_of`` finds the first example held with a content hash."""

    def __init__(self, threshold: float, num_perm: int = DEFAULT_NUM_PERM, max_size: int | None = None) -> None:
        if not 0 < threshold <= 1:
            raise ValueError(f"near-duplicate threshold must be in (0, 1], not {threshold}")
        if max_size is not None and max_size < 1:
            raise ValueError(f"the index must hold at least one example, not {max_size}")
        self.threshold = threshold
        self.num_perm = num_perm
        self.max_size = max_size
        self._lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self._signatures: dict[str, list[int]] = {}
        self._by_hash: dict[str, str] = {}
        self._hash_held_by: dict[str, str] = {}  # example id -> the content hash it is ``exact_of``'s answer for

    def __contains__(self, example_id: str) -> bool:
        return example_id in self._signatures

    def __len__(self) -> int:
        return len(self._signatures)

    def add(self, example_id: str, values: list[int], content_hash: str | None = None) -> list[str]:
        """Hold one more example; the ids evicted to stay within ``max_size`` (oldest first)."""
        if example_id in self._signatures:
            return []
        self._signatures[example_id] = values  # insertion order: the oldest first
        self._lsh.insert(example_id, _minhash(values, self.num_perm))
        if content_hash is not None and content_hash not in self._by_hash:
            self._by_hash[content_hash] = example_id
            self._hash_held_by[example_id] = content_hash
        evicted = []
        while self.max_size is not None and len(self._signatures) > self.max_size:
            oldest = next(iter(self._signatures))
            self.remove(oldest)
            evicted.append(oldest)
        return evicted

    def remove(self, example_id: str) -> None:
        if self._signatures.pop(example_id, None) is None:
            return
        self._lsh.remove(example_id)
        content_hash = self._hash_held_by.pop(example_id, None)
        if content_hash is not None:
            del self._by_hash[content_hash]

    def exact_of(self, content_hash: str) -> str | None:
        return self._by_hash.get(content_hash)

    def query(self, values: list[int], *, exclude: str | None = None) -> list[str]:
        """Earlier examples at or above the threshold, most similar first."""
        candidates = [c for c in self._lsh.query(_minhash(values, self.num_perm)) if c != exclude]
        scored = [(jaccard(values, self._signatures[c]), c) for c in candidates]
        return [c for s, c in sorted(scored, key=lambda x: (-x[0], x[1])) if s >= self.threshold]

    @classmethod
    def of(cls, entries: Iterable[tuple[str, list[int], str | None]], threshold: float,
           num_perm: int = DEFAULT_NUM_PERM, max_size: int | None = None) -> "NearDuplicateIndex":
        """From (example id, signature, content hash) in the order they were added."""
        index = cls(threshold, num_perm, max_size)
        for example_id, values, content_hash in entries:
            index.add(example_id, values, content_hash)
        return index


def dedupe_decision(example: Mapping[str, Any], *, exact_of: str | None,
                    near_of: list[str]) -> dict[str, Any]:
    """What dedupe does to an admitted example: keep it, or reject it as a duplicate of an earlier one.

    Whichever split the earlier example is in, the later one is rejected: a near-duplicate of a
    holdout example must never reach training, and one of a training example must not inflate the
    holdout score.
    """
    if exact_of is not None and exact_of != example["example_id"]:
        return {"admitted": False, "near_duplicate_of": exact_of, **rejection(RejectCode.EXACT_DUPLICATE, of=exact_of)}
    near = [n for n in near_of if n != example["example_id"]]
    if near:
        return {"admitted": False, "near_duplicate_of": near[0], **rejection(RejectCode.NEAR_DUPLICATE, of=near[0])}
    return {"admitted": True, "near_duplicate_of": None, "reject_code": None, "reject_reason": None}


def canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))
