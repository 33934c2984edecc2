"""The parameter objects (ptm_kernels/kernel_params.py) take their arguments like the dataclasses they are,
although their __init__ stores the fields in one step (the ops build them on every call)."""

import dataclasses
import inspect

import pytest
import torch

from ptm_kernels import kernel_params
from ptm_kernels.kernel_params import AttentionParams, Bias, Dropout, RelativeParams, RelativeStream, Visibility

CLASSES = [Visibility, Bias, Dropout, AttentionParams, RelativeParams, RelativeStream]


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_init_takes_the_fields_in_order_with_their_defaults(cls):
    fields = dataclasses.fields(cls)
    params = list(inspect.signature(cls).parameters.values())
    assert [p.name for p in params] == [f.name for f in fields]
    assert [p.default for p in params] == [inspect.Parameter.empty if f.default is dataclasses.MISSING else f.default
                                          for f in fields]
    values = [object() for _ in fields]  # distinct markers: each must land in its own field
    by_position, by_name = cls(*values), cls(**{f.name: v for f, v in zip(fields, values)})
    for obj in (by_position, by_name):
        assert [getattr(obj, f.name) for f in fields] == values
    with pytest.raises(TypeError):
        cls(*values, object())
    with pytest.raises(TypeError):
        cls(*values, not_a_field=1)


def test_defaults_and_required_fields():
    v = Visibility()
    assert (v.causal, v.window_left, v.key_lengths, v.block_m) == (False, -1, None, 0)
    p = AttentionParams(0.5)
    assert p.scale == 0.5 and isinstance(p.vis, Visibility) and p.bias.dense is None and p.dropout.p == 0.0
    with pytest.raises(TypeError, match="scale"):
        AttentionParams()


def test_still_frozen_and_replaceable():
    v = Visibility(causal=True, window_left=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        v.causal = False
    w = dataclasses.replace(v, window_left=5)
    assert (w.causal, w.window_left) == (True, 5) and v.window_left == 3
    r = kernel_params.replaced(v, block_m=16)
    assert (r.causal, r.window_left, r.block_m) == (True, 3, 16)
    seed = torch.tensor(7)
    assert Dropout(0.1, seed).seed_value == 7


def test_a_field_the_one_step_init_cannot_fill_is_refused():
    with pytest.raises(TypeError, match="default_factory"):
        @kernel_params._params_class
        class WithFactory:
            items: list = dataclasses.field(default_factory=list)
