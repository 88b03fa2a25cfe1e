"""Curation's benchmarks, each a ``python -m`` command that writes JSON (recorded runs in ``results/``):

    python -m adaptloop.streams.bench.throughput   # curation against a pass-through Faust app
    python -m adaptloop.streams.bench.redaction    # PII redaction on adversarial text against ordinary text
    python -m adaptloop.streams.bench.soak         # a worker's tables and memory over a long run
"""
