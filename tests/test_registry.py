import inspect

import pytest

from modrun.core.errors import UserError
from modrun.core.registry import REGISTRIES, Registry


def test_register_get_and_duplicates():
    reg = Registry("widget")

    @reg.register("spinner")
    def spinner(speed: int = 1):
        """Spins at a speed."""
        return speed

    assert reg.get("spinner") is spinner
    assert reg.summaries() == [("spinner", "Spins at a speed.")]
    with pytest.raises(ValueError, match="already registered"):
        reg.register("spinner")(lambda: None)


def test_unknown_name_suggests_closest():
    reg = Registry("widget")
    reg.register("spinner")(lambda: None)
    reg.register("slider")(lambda: None)
    with pytest.raises(UserError, match="unknown widget 'spiner' — did you mean spinner"):
        reg.get("spiner")


def test_every_builtin_entry_loads_and_is_described():
    for group, reg in REGISTRIES.items():
        assert reg.names(), group
        for name, summary in reg.summaries():
            assert summary, f"{group}/{name} has no description"
            assert callable(reg.get(name)), f"{group}/{name}"
            inspect.signature(reg.get(name))


def test_user_component_clashing_with_builtin_is_rejected():
    from modrun.core.registry import MODELS

    with pytest.raises(ValueError, match="already registered"):
        MODELS.register("resnet20")(lambda **kw: None)
