"""Which version and replica a call goes to.

An alias goes to its incumbent (newest PROMOTED version loaded on some replica, or an earlier
canary still undecided when the current one came, else the base model: ``canary_and_incumbent``),
except for a share of its calls, which go to its canary (the newest RELEASED version newer than the
PROMOTED one, loaded on some replica; the canary controller promotes or rolls it back): the release's own ``canary_share`` where it carries one (the gate's smaller share for a
candidate it could not decide), never more than the gateway's ``canary_share``. The share is exact
per gateway (a deterministic stride, not a coin), so a measured share is the configured one. Among several replicas, a call goes only to replicas whose sidecar reports
the version loaded, round robin; a replica whose sidecar stops answering gets no calls while a
healthy one exists (``serving.replicas`` keeps each replica's report current). If vLLM answers 404 for the routed
version (unloaded since the sidecar last reported, e.g. during a swap) the call is answered by the
incumbent or base instead: swaps never fail a call.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Mapping

from adaptloop.artifacts import alias as make_alias
from adaptloop.serving.canary import canary_and_incumbent
from adaptloop.serving.registry import Release, ReleaseReader
from adaptloop.serving.replicas import ReplicaState
from adaptloop.settings import Replica

DEFAULT_TASK = "default"
TASK_HEADER = "x-adaptloop-task"


@dataclass(frozen=True)
class Route:
    """Where one request goes: the name vLLM serves it under, on which replica, and what to record."""

    tenant: str
    task: str
    served_model: str
    version: str | None  # None: the base model
    adapter_name: str | None  # the alias, when an adapter serves it
    replica: ReplicaState | None = None
    role: str = "base"  # canary | incumbent | base
    fallback: str | None = None  # the incumbent's version (None = base) if the routed version is gone


class UnknownModel(LookupError):
    """A ``model`` that is neither ``tenant/task`` of the caller's tenant (a task of the catalogue) nor the base model."""


class UnknownTask(LookupError):
    """An ``x-adaptloop-task`` that names no task of the catalogue."""


def take_canary(count: int, share: float) -> bool:
    """Call number ``count`` (0-based) of an alias goes to the canary: an exact stride, not a coin flip."""
    return math.floor((count + 1) * share) > math.floor(count * share)


class Router:
    """Alias -> a share to the newest RELEASED version, the rest to the incumbent (see ``canary_and_incumbent``).

    The share is the release's own ``canary_share`` if it has one, capped by ``canary_share`` (the gateway's
    setting, which is also the share of a release without one; 0 sends no call to any canary).
    """

    def __init__(self, reader: ReleaseReader, base_model: str, replicas: list[Replica], canary_share: float,
                 tasks: frozenset[str]) -> None:
        self.reader = reader
        self.tasks = tasks
        self.base_model = base_model
        self.replicas = [ReplicaState(r.vllm_url.rstrip("/"), r.sidecar_url.rstrip("/")) for r in replicas]
        self.canary_share = canary_share
        self._calls: dict[tuple[str, str], int] = {}
        self._turn = itertools.count()

    @property
    def loaded(self) -> frozenset[str]:
        """Versions loaded on at least one replica."""
        return frozenset().union(*(r.loaded for r in self.replicas))

    @staticmethod
    def parse_alias(model: str) -> tuple[str, str] | None:
        tenant, sep, task = model.partition("/")
        if sep and tenant and task and "/" not in task:
            return tenant, task
        return None

    def replica_for(self, version: str | None) -> ReplicaState | None:
        """Round robin over the healthy replicas that have ``version`` (any replica for the base)."""
        having = [r for r in self.replicas if version is None or version in r.loaded]
        healthy = [r for r in having if r.healthy] or having
        if not healthy:
            return None
        return healthy[next(self._turn) % len(healthy)]

    def live(self, tenant: str, task: str) -> tuple[Release | None, Release | None]:
        """(canary, incumbent) of an alias among the versions loaded somewhere."""
        loaded = self.loaded
        releases = {v: r for v, r in self.reader.releases().items()
                    if (r.tenant, r.task) == (tenant, task) and v in loaded}
        return canary_and_incumbent(releases, tenant, task)

    def share_of(self, canary: Release) -> float:
        """The share of its alias's calls ``canary`` gets."""
        own = canary.canary_share
        return self.canary_share if own is None else max(0.0, min(own, self.canary_share))

    def route(self, model: str, tenant: str, headers: Mapping[str, str]) -> Route:
        if model == self.base_model:
            task = headers.get(TASK_HEADER, DEFAULT_TASK)
            if task != DEFAULT_TASK and task not in self.tasks:
                raise UnknownTask(task)
            return Route(tenant, task, self.base_model, None, None, self.replica_for(None))
        parsed = self.parse_alias(model)
        if parsed is None or parsed[0] != tenant or parsed[1] not in self.tasks:
            raise UnknownModel(model)
        task = parsed[1]
        canary, incumbent = self.live(tenant, task)
        fallback = incumbent.version if incumbent else None
        share = self.share_of(canary) if canary is not None else 0.0
        if canary is not None and share > 0:
            count = self._calls.get((tenant, task), 0)
            self._calls[(tenant, task)] = count + 1
            if take_canary(count, share):
                return self.adapter_route(tenant, task, canary.version, "canary", fallback)
        if incumbent is not None:
            return self.adapter_route(tenant, task, incumbent.version, "incumbent", None)
        return Route(tenant, task, self.base_model, None, None, self.replica_for(None))

    def adapter_route(self, tenant: str, task: str, version: str, role: str, fallback: str | None) -> Route:
        return Route(tenant, task, version, version, make_alias(tenant, task), self.replica_for(version), role, fallback)

    def base_route(self, route: Route) -> Route:
        """Where a call goes when its routed version is gone: the incumbent, else the base."""
        if route.fallback and route.fallback != route.version:
            return self.adapter_route(route.tenant, route.task, route.fallback, "incumbent", None)
        return Route(route.tenant, route.task, self.base_model, None, None, self.replica_for(None))

    def models(self, tenant: str) -> list[dict[str, Any]]:
        """The base and an alias of ``tenant`` per catalogue task, with what it routes to now."""
        entries = [{"id": self.base_model, "object": "model", "created": 0, "owned_by": "adaptloop", "adapter": None}]
        for task in sorted(self.tasks):
            canary, incumbent = self.live(tenant, task)
            entries.append({"id": make_alias(tenant, task), "object": "model", "created": 0, "owned_by": tenant,
                            "adapter": incumbent.version if incumbent else (canary.version if canary else None),
                            "canary": canary.version if canary else None,
                            "incumbent": incumbent.version if incumbent else None})
        return entries

