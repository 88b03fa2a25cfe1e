"""Curation: Faust agents (``adaptloop.streams.app``, needs faust-streaming) around pure stages.

The stages import without Faust, so they can be used and tested from any environment.
"""

from adaptloop.schemas.contract import SourceRef, dead_letter
from adaptloop.streams.stages import (
    Contract,
    Decoder,
    curate,
    score,
    split,
)
from adaptloop.streams.windows import training_request, window_update

__all__ = [
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
