"""The config nodes hand every widget to a config field, and refuse one that names none."""

from __future__ import annotations

import pytest

CONFIG_NODES = ("ConfigureNoise", "ConfigureOptimizer", "ConfigureNetwork", "ConfigureSpeed")


def _schema_defaults(node_class) -> dict:
    """Every input of the node with the default its schema declares (what a new node holds)."""
    spec = node_class.INPUT_TYPES()
    return {
        name: entry[1]["default"]
        for section in ("required", "optional")
        for name, entry in (spec.get(section) or {}).items()
    }


def test_fields_splits_widgets_by_field_and_refuses_one_that_names_no_field(comfy):
    config_nodes = comfy.pack_module("nodes.config_nodes")
    noise, loss = config_nodes.NoiseConfig, config_nodes.LossConfig
    assert config_nodes._fields({"noise_offset": 0.1, "min_snr_gamma": 5.0}, noise, loss) == (
        {"noise_offset": 0.1},
        {"min_snr_gamma": 5.0},
    )
    with pytest.raises(TypeError, match=r"\['min_snr_gama'\].*NoiseConfig or LossConfig"):
        config_nodes._fields({"noise_offset": 0.1, "min_snr_gama": 5.0}, noise, loss)


@pytest.mark.parametrize("node", ["ConfigureNoise", "ConfigureOptimizer"])
def test_config_node_refuses_a_widget_it_would_ignore(comfy, node):
    node_class = getattr(comfy.pack_module("nodes"), node)
    with pytest.raises(TypeError, match="ema_warmup"):
        node_class.execute(**_schema_defaults(node_class), ema_warmup=True)


@pytest.mark.parametrize("node", CONFIG_NODES)
def test_config_node_builds_its_configs_from_every_default_widget(comfy, node):
    node_class = getattr(comfy.pack_module("nodes"), node)
    node_class.execute(**_schema_defaults(node_class))  # no widget is left over


def test_configure_noise_passes_each_widget_to_the_field_of_its_name(comfy):
    node_class = comfy.pack_module("nodes").ConfigureNoise
    widgets = _schema_defaults(node_class)
    value = node_class.execute(**widgets).result[0]
    got = {name: getattr(value.noise, name, None) for name in widgets}
    got.update({name: getattr(value.loss, name) for name in widgets if not hasattr(value.noise, name)})
    assert got == widgets
