"""Every MARSM setting is defined once (marsm_dist.options); every place that lists settings is
derived from it: the constructor, validation, saved and agreed keys, and the three framework
configs (DeepSpeed JSON, torchtitan, Megatron flags). Each check compares a derived list with the
table, so a setting added to the table shows up everywhere or fails here."""

from __future__ import annotations

import argparse
import inspect

import pytest
import torch

from marsm_dist import MARSM
from marsm_dist.options import (
    AGREED_KEYS,
    CONFIG_OPTIONS,
    INSTANCE_ATTRIBUTES,
    OPTIONS,
    SAVED_GROUP_KEYS,
    group_defaults,
)

_NAMES = [o.name for o in OPTIONS if o.argument]


def _groups():
    return [{"params": [torch.nn.Parameter(torch.randn(4, 3))], "use_marsm": True},
            {"params": [torch.nn.Parameter(torch.randn(3))], "use_marsm": False}]


def test_the_constructor_takes_every_option_with_its_default():
    sig = inspect.signature(MARSM)
    assert list(sig.parameters)[1:] == _NAMES
    for o in OPTIONS:
        if o.argument:
            assert sig.parameters[o.name].default == o.default, o.name
            assert (sig.parameters[o.name].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD) == o.positional
    opt = MARSM(_groups())
    for key, value in group_defaults().items():
        assert opt.defaults[key] == value, key
        if key != "use_marsm":  # (the groups above set it)
            assert opt.param_groups[0][key] == value, key
    for attribute, o in INSTANCE_ATTRIBUTES.items():
        assert getattr(opt, attribute) == o.default, attribute
    # The docstring documents every argument.
    for name in _NAMES:
        assert f"\n        {name}: " in MARSM.__doc__, name


def test_positional_arguments_bind_in_table_order():
    positional = [o for o in OPTIONS if o.positional]
    values = [0.5 * o.default if isinstance(o.default, float) else o.default for o in positional]
    opt = MARSM(_groups(), *values)
    for o, v in zip(positional, values, strict=True):
        assert opt.param_groups[0][o.name] == v, o.name
    with pytest.raises(TypeError, match="multiple values for argument 'lr'"):
        MARSM(_groups(), 0.1, lr=0.2)
    with pytest.raises(TypeError, match="at most"):
        MARSM(_groups(), *values, True)


@pytest.mark.parametrize("name", [n for n in _NAMES if n != "process_group"])
def test_every_option_refuses_a_wrong_value_by_name(name):
    with pytest.raises(ValueError, match=f"Invalid {name}"):
        MARSM(_groups(), **{name: object()})


@pytest.mark.parametrize("key", [o.name for o in OPTIONS if o.per_group and o.argument])
def test_every_group_value_is_checked_when_a_group_is_added(key):
    opt = MARSM(_groups()[:1])
    with pytest.raises(ValueError, match=f"Invalid {key}.*param group 1"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2, 2))], key: object()})


def test_saved_agreed_and_defaulted_keys_come_from_the_table():
    per_group = [o.name for o in OPTIONS if o.per_group]
    assert list(AGREED_KEYS) == per_group  # every value a step uses is agreed between ranks
    assert set(SAVED_GROUP_KEYS) <= set(per_group)
    # A group saved before the later keys existed loads with their defaults.
    opt = MARSM(_groups())
    sd = opt.state_dict()
    later = [k for k in per_group if k not in SAVED_GROUP_KEYS]
    for group in sd["param_groups"]:
        for key in later:
            group.pop(key)
    fresh = MARSM(_groups())
    fresh.load_state_dict(sd)
    for key in later:
        assert fresh.param_groups[0][key] == group_defaults()[key] or key == "use_marsm", key
    # Another optimizer's state dict lacks the keys saved since 0.1: refused, naming them.
    adam = torch.optim.AdamW([torch.nn.Parameter(torch.randn(4, 3))])
    with pytest.raises(ValueError, match="another optimizer's"):
        MARSM(_groups()[:1]).load_state_dict(adam.state_dict())


def test_deepspeed_json_accepts_exactly_the_config_options():
    deepspeed = pytest.importorskip("marsm_dist.adapters.deepspeed")
    assert deepspeed._OPTIONS == {o.name for o in CONFIG_OPTIONS}
    assert "process_group" not in deepspeed._OPTIONS and "lr" in deepspeed._OPTIONS


def test_torchtitan_config_has_a_field_per_config_option():
    torchtitan = pytest.importorskip("marsm_dist.adapters.torchtitan")
    config = torchtitan.MARSMContainer.Config()
    for o in CONFIG_OPTIONS:
        assert getattr(config, o.name) == o.config_default, o.name
    assert torchtitan.MARSMContainer.Config._owner is torchtitan.MARSMContainer


def test_megatron_flags_cover_every_option_megatron_does_not_set_itself():
    args_mod = pytest.importorskip("marsm_dist.adapters.megatron.args")
    parser = args_mod.add_marsm_args(argparse.ArgumentParser())
    kwargs = args_mod.marsm_kwargs_from_args(parser.parse_args([]))
    given_by_megatron = {"lr", "weight_decay", "adamw_betas", "adamw_eps", "approx"}
    assert set(kwargs) - {"split_qkv"} == {o.name for o in CONFIG_OPTIONS} - given_by_megatron
    for o in CONFIG_OPTIONS:
        if o.name in kwargs:
            assert kwargs[o.name] == o.config_default, o.name
    # And what the flags select is a valid MARSM.
    kwargs.pop("split_qkv")
    MARSM(_groups(), **kwargs)


def test_every_option_is_documented():
    """The options table of docs/usage.md (or, for the sharding options, docs/fsdp2.md) names each."""
    from pathlib import Path

    docs = Path(__file__).resolve().parents[1] / "docs"
    text = (docs / "usage.md").read_text() + (docs / "fsdp2.md").read_text()
    missing = [o.name for o in OPTIONS if f"`{o.name}`" not in text]
    assert not missing, f"options without a line in docs/usage.md: {missing}"
