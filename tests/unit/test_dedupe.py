"""Exact and near-duplicate detection (pure; the Faust agent keeps the signatures in a table)."""

from __future__ import annotations

import pytest

from adaptloop.streams import dedupe
from adaptloop.demo_tasks import OrderGenerator


def ex(user: str, completion: str = "{}", example_id: str = "e", system: str = "sys") -> dict:
    return {"example_id": example_id, "completion": completion,
            "prompt_messages": [{"role": "system", "content": system}, {"role": "user", "content": user}]}


def test_content_hash_normalizes_case_and_whitespace_and_ignores_the_system_prompt():
    a = ex("Alice wants 3 lamps  delivered to Lyon", system="one")
    b = ex("alice wants 3 lamps delivered\nto LYON", system="two")
    assert dedupe.content_hash(a) == dedupe.content_hash(b)
    assert dedupe.content_hash(a) != dedupe.content_hash(ex("Alice wants 4 lamps delivered to Lyon"))


def test_near_duplicates_are_found_and_distinct_orders_are_not():
    cases = OrderGenerator(seed=5).cases(60)
    index = dedupe.NearDuplicateIndex(threshold=0.7)
    for n, case in enumerate(cases):
        sig = dedupe.signature(ex(case.sentence, case.answer))
        assert index.query(sig) == [], (n, case.sentence)  # no false positive among distinct orders
        index.add(f"e{n}", sig)
    base = cases[0]
    tweaked = base.sentence.replace(".", "!") + " Thanks a lot."
    hits = index.query(dedupe.signature(ex(tweaked, base.answer)))
    assert hits[:1] == ["e0"]
    assert index.query(dedupe.signature(ex(base.sentence, base.answer)), exclude="e0") == []
    first = ex(base.sentence, base.answer)
    rebuilt = dedupe.NearDuplicateIndex.of([("e0", dedupe.signature(first), dedupe.content_hash(first))], 0.7)
    assert rebuilt.query(dedupe.signature(ex(tweaked, base.answer))) == ["e0"]
    assert rebuilt.exact_of(dedupe.content_hash(ex(base.sentence.upper(), base.answer))) == "e0"
    assert rebuilt.exact_of(dedupe.content_hash(ex(tweaked, base.answer))) is None


def test_decision_rejects_the_later_duplicate_whatever_its_split():
    e = {"example_id": "new"}
    assert dedupe.dedupe_decision(e, exact_of=None, near_of=[])["admitted"]
    assert dedupe.dedupe_decision(e, exact_of="new", near_of=["new"])["admitted"]  # itself, replayed
    exact = dedupe.dedupe_decision(e, exact_of="old", near_of=[])
    assert (exact["admitted"], exact["near_duplicate_of"], exact["reject_code"], exact["reject_reason"]) == \
        (False, "old", "EXACT_DUPLICATE", "exact duplicate of old")
    near = dedupe.dedupe_decision(e, exact_of=None, near_of=["h1"])
    assert (near["admitted"], near["near_duplicate_of"]) == (False, "h1")


def test_threshold_must_be_a_fraction():
    with pytest.raises(ValueError):
        dedupe.NearDuplicateIndex(threshold=0)


def test_signatures_match_a_fresh_minhash_so_stored_ones_stay_comparable():
    """The cached permutations are the ones a fresh MinHash draws: signatures in the changelog stay valid."""
    from datasketch import MinHash

    example = ex("Bob wants 2 chairs delivered to Porto", '{"item": "chair"}')
    fresh = MinHash(num_perm=dedupe.DEFAULT_NUM_PERM, seed=1, scheme=dedupe.SCHEME)
    fresh.update_batch([s.encode() for s in dedupe.shingles(dedupe.normalized_text(example))])
    assert dedupe.signature(example) == dedupe.signature(example) == [int(v) for v in fresh.hashvalues]
    assert dedupe.jaccard(dedupe.signature(example), [int(v) for v in fresh.hashvalues]) == 1.0
    with pytest.raises(ValueError, match="signature of 3 values"):
        dedupe.NearDuplicateIndex(0.8).add("short", [1, 2, 3])


def test_the_index_keeps_its_newest_examples_and_forgets_the_oldest_whole():
    index = dedupe.NearDuplicateIndex(threshold=0.7, max_size=2)
    examples = {f"e{i}": ex(f"Order {i}: customer {name} wants {i} crates of {item} shipped to {city} on Monday")
                for i, (name, item, city) in enumerate([("Ada", "pears", "Oslo"), ("Bo", "nails", "Lima"),
                                                        ("Cy", "paint", "Rome")])}
    evicted = [index.add(i, dedupe.signature(e), dedupe.content_hash(e)) for i, e in examples.items()]
    assert evicted == [[], [], ["e0"]] and len(index) == 2 and "e0" not in index
    first = examples["e0"]
    assert index.exact_of(dedupe.content_hash(first)) is None          # its exact hash left with it
    assert index.query(dedupe.signature(first)) == []                  # and its LSH entry
    assert index.exact_of(dedupe.content_hash(examples["e2"])) == "e2"
    assert index.query(dedupe.signature(examples["e2"])) == ["e2"]
    rebuilt = dedupe.NearDuplicateIndex.of(((i, dedupe.signature(e), None) for i, e in examples.items()), 0.7,
                                           max_size=2)
    assert "e0" not in rebuilt and len(rebuilt) == 2
