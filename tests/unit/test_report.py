"""The report's shaping functions (pure) and one render from records in memory (files written, PNGs valid)."""

from __future__ import annotations

import json

from adaptloop.ops.report import write_report
from adaptloop.ops.report_data import (Records, attribute_dead_letter, decisions, funnel, latest_examples, loss_curves,
                                       pairs, rolling_success, success_by_version, success_points)

ACME = ("acme", "order-extract")


def example(i, kind="SUCCESS", *, tenant="acme", task="order-extract", served_by=None, admitted=None, split="TRAIN",
            reason=None, event_time=None):
    return {"example_id": f"e{i}", "tenant": tenant, "task": task, "kind": kind, "split": split,
            "admitted": kind != "FAILURE" if admitted is None else admitted, "reject_reason": reason,
            "served_by": served_by, "event_time": event_time if event_time is not None else 1000 * i,
            "curated_at": 1000 * i + 5}


def release(version, state, at, *, tenant="acme", task="order-extract", training_json="{}", evidence_json="{}",
            decided_by="gate"):
    return {"version": version, "tenant": tenant, "task": task, "state": state, "reason": f"{state} because",
            "created_at": at, "decided_by": decided_by, "training_json": training_json, "evidence_json": evidence_json,
            "regression": [], "evaluation": {"metric": "m", "holdout_count": 5, "candidate_score": 0.8,
                                             "incumbent": "base", "incumbent_score": 0.0, "margin": 0.05},
            "lineage": {"request_id": "r1", "dataset_digest": "sha256:x", "train_example_ids": ["e1", "e2"]}}


def test_success_points_follow_the_served_answers_by_event_time_and_the_last_record_wins():
    curated = [example(3, "CORRECTION"), example(1, "SUCCESS", served_by="v1"), example(2, "FAILURE"),
               example(4, tenant="globex"), example(3, "SUCCESS")]  # e3 re-emitted: the last record wins
    points = success_points(curated, ACME)
    assert [(p.at_ms, p.ok, p.served_by) for p in points] == [(1000, True, "v1"), (2000, False, None), (3000, True, None)]
    assert len(latest_examples(curated)) == 4


def test_rolling_success_and_success_by_version():
    points = success_points([example(i, "CORRECTION") for i in range(4)]
                            + [example(i, "SUCCESS", served_by="v1") for i in range(4, 8)], ACME)
    assert [v for _, v in rolling_success(points, window=4)] == [0, 0, 0, 0, 1, 1, 1, 1]  # restarts with v1
    mixed = success_points([example(i, "CORRECTION" if i % 2 else "SUCCESS") for i in range(6)], ACME)
    assert [v for _, v in rolling_success(mixed, window=4)] == [1, 0.5, 2 / 3, 0.5, 0.5, 0.5]
    assert success_by_version(points) == [{"served_by": "base", "successes": 0, "count": 4, "success": 0.0},
                                          {"served_by": "v1", "successes": 4, "count": 4, "success": 1.0}]


def test_decisions_keep_every_record_with_its_evidence():
    rows = decisions([release("v1", "RELEASED", 10, evidence_json='{"wins": 4}'),
                      release("v1", "PROMOTED", 20, decided_by="canary"), release("g1", "RELEASED", 15, tenant="globex"),
                      release("v2", "REJECTED", 30, evidence_json="not json")], ACME)
    assert [(r["version"], r["state"], r["decided_by"]) for r in rows] == [
        ("v1", "RELEASED", "gate"), ("v1", "PROMOTED", "canary"), ("v2", "REJECTED", "gate")]
    assert rows[0]["evidence"] == {"wins": 4} and rows[2]["evidence"] == {"unparsable": "not json"}
    assert rows[0]["candidate_score"] == 0.8 and rows[0]["train_examples"] == 2


def test_loss_curves_tolerate_empty_and_malformed_training_json():
    curves = loss_curves([release("v1", "RELEASED", 1, training_json=json.dumps({"loss_curve": [[2, 1.5], [4, 0.5]]})),
                          release("v0", "RELEASED", 1),  # "{}" from an older trainer
                          release("v2", "RELEASED", 1, training_json="{broken"),
                          release("v3", "RELEASED", 1, training_json=json.dumps({"loss_curve": [["a", 1], [1]]}))], ACME)
    assert curves == {"v1": [(2.0, 1.5), (4.0, 0.5)]}


def test_funnel_counts_each_stage_and_groups_reject_reasons():
    records = Records(
        interactions=[{"interaction_id": f"i{i}", "tenant": "acme", "task": "order-extract"} for i in range(5)]
        + [{"interaction_id": "g", "tenant": "globex", "task": "ticket-triage"}],
        outcomes=[{"outcome_id": f"o{i}", "interaction_id": f"i{i}"} for i in range(4)] + [{"outcome_id": "og", "interaction_id": "g"}],
        curated=[example(1), example(2, split="HOLDOUT"), example(3, "FAILURE", reason="near duplicate of e1"),
                 example(4, "FAILURE", reason="near duplicate of e2")],
        requests=[{"request_id": "r1", "tenant": "acme", "task": "order-extract"}] * 2,
        releases=[release("v1", "RELEASED", 1), release("v1", "PROMOTED", 2), release("v2", "REJECTED", 3)])
    counts = funnel(records, ACME, [("acme", "order-extract"), ("acme", "?"), ("globex", "ticket-triage"), None])
    assert counts == {"interactions": 5, "outcomes": 4, "curated": 4, "admitted": 2, "admitted TRAIN": 1,
                      "admitted HOLDOUT": 1, "rejected: NEAR_DUPLICATE": 2, "dead letters": 2,
                      "training requests": 1, "adapters PROMOTED": 1, "adapters REJECTED": 1}
    assert pairs(records) == [("acme", "order-extract"), ("globex", "ticket-triage")]


def test_dead_letters_are_attributed_when_their_bytes_decode():
    from adaptloop.errors import DeserializationError

    def bad(value):
        raise DeserializationError("nope")

    decoders = {"interaction": lambda v: {"tenant": "acme", "task": "order-extract"} if v == b"i" else bad(v),
                "outcome": lambda v: {"tenant": "acme"} if v == b"o" else bad(v)}
    assert attribute_dead_letter({"value": b"i"}, decoders) == ("acme", "order-extract")
    assert attribute_dead_letter({"value": b"o"}, decoders) == ("acme", "?")
    assert attribute_dead_letter({"value": b"junk"}, decoders) is None
    assert attribute_dead_letter({"value": None}, decoders) is None


def test_write_report_renders_pages_and_pngs(tmp_path):
    records = Records(
        interactions=[{"interaction_id": f"i{i}", "tenant": "acme", "task": "order-extract", "event_time": 1000 * i}
                      for i in range(1, 9)],
        curated=[example(i, "CORRECTION") for i in range(1, 5)] + [example(i, served_by="acme--order-extract--abc")
                                                                   for i in range(5, 9)],
        releases=[release("acme--order-extract--abc", "RELEASED", 4500,
                          training_json=json.dumps({"loss_curve": [[1, 2.0], [2, 0.4]]}),
                          evidence_json='{"<script>": 1}')])
    demo = {"measurements": [{"tenant": "acme", "task": "order-extract", "cycle": 0, "at_ms": 500, "success": 0.0,
                              "count": 4, "served_by": ["base"]}]}
    pages = write_report(records, tmp_path, demo=demo, dead_letter_pairs=[None])
    assert [p.name for p in pages] == ["acme--order-extract.html"]
    html = pages[0].read_text()
    assert "RELEASED" in html and "&lt;script&gt;" in html and "<script>" not in html  # escaped evidence
    for png in ("success", "loss", "funnel"):
        assert (tmp_path / f"acme--order-extract-{png}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    index = (tmp_path / "index.html").read_text()
    assert "acme--order-extract.html" in index and "could not be attributed to a tenant: 1" in index
