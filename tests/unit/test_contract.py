"""The contract module: its symbols match the schemas."""

from __future__ import annotations

from adaptloop.schemas import bundled_store
from adaptloop.schemas.contract import SERVABLE, WITHDRAWN, ReleaseState, code_version


def _enum_symbols(stem: str, field: str) -> list[str]:
    schema = bundled_store().latest(stem).raw
    declared = next(f["type"] for f in schema["fields"] if f["name"] == field)
    enum = next(t for t in declared if isinstance(t, dict)) if isinstance(declared, list) else declared
    return enum["symbols"]


def test_the_enums_are_the_schemas_symbols():
    assert [s.value for s in ReleaseState] == _enum_symbols("adapter_release", "state")
    assert SERVABLE == {"RELEASED", "PROMOTED"} and SERVABLE.isdisjoint(WITHDRAWN)
    assert SERVABLE | WITHDRAWN == {s.value for s in ReleaseState}


def test_code_version_names_the_installed_package():
    assert code_version().startswith("adaptloop==")
