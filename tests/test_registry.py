"""Every set of named things that varies is kept one way (diffinv.registry): register, get, list, in order."""

from __future__ import annotations

import pytest

from diffinv.classify.models import ARCHITECTURES
from diffinv.config import ConfigError
from diffinv.data.export import EXPORT_FORMATS
from diffinv.data.real import OPENERS, DataError, open_images
from diffinv.diffusion.methods import METHODS
from diffinv.registry import Registry, RegistryError
from diffinv.runs import RunError


def test_a_registry_keeps_order_and_help_and_names_what_it_has():
    things: Registry[int] = Registry("widget")
    things.add("b", 2, "the second")

    @things.register("a", "the first")
    def a() -> int:
        return 1

    assert things.names() == ["b", "a"] and list(things) == ["b", "a"] and len(things) == 2 and "a" in things
    assert things.get("a") is a and things["b"] == 2 and things.help("a") == "the first"
    with pytest.raises(RegistryError, match="widget must be one of b, a; got 'c'"):
        things.get("c")
    with pytest.raises(ValueError, match="registered twice"):
        things.add("b", 3)


@pytest.mark.parametrize(("registry", "error", "expected"), [
    (ARCHITECTURES, ConfigError, {"resnet18", "shufflenetv2", "small-cnn"}),
    (EXPORT_FORMATS, RunError, {"imagefolder", "hf", "webdataset"}),
    (OPENERS, DataError, {"folder", "npz", "idx", "csv", "digits", "hf"}),
    (METHODS, ConfigError, {"di", "img2img", "retrieval", "lora"}),
])
def test_the_libraries_registries_are_registries_with_their_own_errors(registry, error, expected):
    assert isinstance(registry, Registry) and expected <= set(registry.names())
    with pytest.raises(error, match="must be one of"):
        registry.get("nope")


def test_di_is_the_first_method_and_an_unknown_format_is_one_line():
    assert METHODS.names()[0] == "di"
    with pytest.raises(DataError, match="--format must be one of folder, npz"):
        open_images("digits", "tiff")
