"""The library's settings are the stage configs' fields, written a second time on purpose (the library never reads a
config): each settings field exists in its config with the same type and the same default, so the two cannot drift."""

from __future__ import annotations

import typing
from dataclasses import MISSING, fields

import pytest

from diffinv.config import GenerateConfig, InvertConfig
from diffinv.diffusion.inversion import InversionSettings
from diffinv.diffusion.methods.base import GenerationSettings


def disagreements(settings: type, config: type, read_elsewhere: frozenset[str] = frozenset()) -> list[str]:
    """Each field of ``settings`` that ``config`` lacks, or has with another type or default."""
    config_fields = {f.name: f for f in fields(config)}
    settings_hints, config_hints = typing.get_type_hints(settings), typing.get_type_hints(config)
    found = []
    for f in fields(settings):
        if f.name in read_elsewhere:
            continue
        twin = config_fields.get(f.name)
        if twin is None:
            found.append(f"{f.name}: not a field of {config.__name__}")
            continue
        if settings_hints[f.name] != config_hints[f.name]:
            found.append(f"{f.name}: {settings_hints[f.name]} here, {config_hints[f.name]} in {config.__name__}")
        mine = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        theirs = twin.default if twin.default is not MISSING else twin.default_factory()  # type: ignore[misc]
        if mine != theirs:
            found.append(f"{f.name}: default {mine!r} here, {theirs!r} in {config.__name__}")
    return found


@pytest.mark.parametrize(("settings", "config", "elsewhere"), [
    (InversionSettings, InvertConfig, frozenset()),
    # adapter_prompt is read from the adapters' folder by the stage, not set in the config.
    (GenerationSettings, GenerateConfig, frozenset({"adapter_prompt"})),
])
def test_every_settings_field_is_its_configs_field_with_the_same_type_and_default(settings, config, elsewhere):
    assert disagreements(settings, config, elsewhere) == []


def test_a_drifted_default_or_a_missing_field_is_found():
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Drifted:
        steps: int = 299  # InvertConfig says 300
        lr: float = 0.3
        nonsense: int = 0

    assert disagreements(Drifted, InvertConfig) == ["steps: default 299 here, 300 in InvertConfig",
                                                   "nonsense: not a field of InvertConfig"]
