"""adaptloop: agents that learn from production.

The public API is ``__all__``: what an agent needs to record its calls and their outcomes, and to
define a task. Everything else in the package is implementation, free to change::

    from adaptloop import KafkaSettings, Recorder, Topics

    with Recorder(KafkaSettings(), Topics()) as rec:
        iid = rec.interaction(tenant="acme", agent="bot", task="order-extract", session_id="s1",
                              messages=[{"role": "user", "content": "..."}], response="{...}")
        rec.outcome(iid, tenant="acme", source="VALIDATOR", success=False, correction="{...}")

    from adaptloop import Verdict, validator

    @validator                      # named in the catalogue: {kind: python, function: "my_agent:is_refund"}
    def is_refund(response, reference=None):
        return Verdict(response.strip() == "refund", 1.0, "one word: refund")

Importing ``adaptloop`` is cheap: each name is imported from its module on first use, so a process
that needs one stage (``adaptloop.streams``, ``.trainers``, ``.serving``) pays only for what it uses.
The operator tools behind the ``adaptloop`` command live in ``adaptloop.ops``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from adaptloop.errors import AdaptloopError, ConfigError, DeliveryError, FeedbackError, SerializationError
    from adaptloop.sdk import FeedbackClient, Recorder
    from adaptloop.settings import KafkaSettings, Topics
    from adaptloop.tasks import Catalogue, load_catalogue
    from adaptloop.tasks import TaskSpec as Task
    from adaptloop.validators import Verdict, validator

#: Public name -> (module, name in it).
_PUBLIC = {
    "Recorder": ("adaptloop.sdk", "Recorder"),
    "FeedbackClient": ("adaptloop.sdk", "FeedbackClient"),
    "KafkaSettings": ("adaptloop.settings", "KafkaSettings"),
    "Topics": ("adaptloop.settings", "Topics"),
    "Task": ("adaptloop.tasks", "TaskSpec"),
    "Verdict": ("adaptloop.validators", "Verdict"),
    "validator": ("adaptloop.validators", "validator"),
    "Catalogue": ("adaptloop.tasks", "Catalogue"),
    "load_catalogue": ("adaptloop.tasks", "load_catalogue"),
    "AdaptloopError": ("adaptloop.errors", "AdaptloopError"),
    "ConfigError": ("adaptloop.errors", "ConfigError"),
    "DeliveryError": ("adaptloop.errors", "DeliveryError"),
    "FeedbackError": ("adaptloop.errors", "FeedbackError"),
    "SerializationError": ("adaptloop.errors", "SerializationError"),
}

__all__ = ["Recorder", "FeedbackClient", "KafkaSettings", "Topics", "Task", "Verdict", "validator", "Catalogue",
           "load_catalogue", "AdaptloopError", "ConfigError", "DeliveryError", "FeedbackError", "SerializationError"]


def __getattr__(name: str) -> Any:
    try:
        module, attribute = _PUBLIC[name]
    except KeyError:
        raise AttributeError(f"module 'adaptloop' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
