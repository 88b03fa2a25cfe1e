"""Curation: Faust agents (``adaptloop.streams.app``, needs faust-streaming) around pure stages.

The stages import without Faust, so they can be used and tested from any environment.
"""

from adaptloop.streams.stages import (
    CODE_VERSION,
    Contract,
    Decoder,
    SourceRef,
    curate,
    dead_letter,
    score,
    split,
    training_request,
    window_update,
)

__all__ = [
    "CODE_VERSION",
    "Contract",
    "Decoder",
    "SourceRef",
    "curate",
    "dead_letter",
    "score",
    "split",
    "training_request",
    "window_update",
]
