"""The flat form of a custom op's arguments, derived from its parameter objects (ptm_kernels/kernel_params.py).

A torch.library op takes tensors and scalars, not objects. `OpArgs` lists an op's arguments as named groups,
e.g. `OpArgs(("q", Tensor), ("k", Tensor), ("v", Tensor), ("", AttentionParams))`, and flattens a dataclass
group field by field (nested dataclasses recursively; the leaf names join the path with "_": `vis_causal`,
`bias_toeplitz`, a stream group "c" gives `c_qu`, `c_vis_causal`). From that one description come the op's
schema (`custom_op`), `flatten` / `unflatten`, the autograd plumbing (`save` / `saved`, `grads`) and the
position of any argument (`index`). Everything is computed once, when the op is defined.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..kernel_params import made
from . import _fast_path


class _Fields:
    """A dataclass's fields in order, with the nested dataclasses' own _Fields."""

    def __init__(self, cls: type):
        hints = typing.get_type_hints(cls)
        self.cls = cls
        self.fields: List[Tuple[str, Any, Optional[_Fields]]] = [
            (f.name, hints[f.name], _Fields(hints[f.name]) if dataclasses.is_dataclass(hints[f.name]) else None)
            for f in dataclasses.fields(cls)]

    def leaves(self, path: Tuple[str, ...]) -> List[Tuple[Tuple[str, ...], Any]]:
        out = []
        for name, hint, sub in self.fields:
            out += [(path + (name,), hint)] if sub is None else sub.leaves(path + (name,))
        return out

    def getters(self, obj: str) -> List[str]:
        """Python expressions reading every leaf of the object named `obj`, in order."""
        out = []
        for name, _, sub in self.fields:
            out += [f"{obj}.{name}"] if sub is None else sub.getters(f"{obj}.{name}")
        return out

    def builder(self, args: str, start: int, classes: Dict[str, type]) -> Tuple[str, int]:
        """(a Python expression building the object from args[start:], the index after its leaves)."""
        items = []
        for name, _, sub in self.fields:
            if sub is None:
                items.append(f"{name!r}: {args}[{start}]")
                start += 1
            else:
                expr, start = sub.builder(args, start, classes)
                items.append(f"{name!r}: {expr}")
        key = f"_C{len(classes)}"
        classes[key] = self.cls
        return f"_made({key}, {{{', '.join(items)}}})", start


class OpArgs:
    """The flat argument list of one custom op, from named groups: (name, Tensor or a scalar type) is one
    argument, (name, a dataclass) all of its fields ("" as the name: the fields' own names)."""

    def __init__(self, *groups: Tuple[str, Any]):
        self._groups = [(name, _Fields(t) if dataclasses.is_dataclass(t) else None) for name, t in groups]
        leaves: List[Tuple[Tuple[str, ...], Any]] = []
        for (name, t), (_, fields) in zip(groups, self._groups):
            prefix = (name,) if name else ()
            leaves += [(prefix, t)] if fields is None else fields.leaves(prefix)
        self.paths = [".".join(p) for p, _ in leaves]  # "q", "vis.causal", "c.q", ...
        self.types = [t for _, t in leaves]
        self._index = {p: i for i, p in enumerate(self.paths)}
        if len(self._index) != len(self.paths):
            raise TypeError(f"OpArgs: two arguments have the same name in {self.paths}")
        self._compile()

    def __len__(self) -> int:
        return len(self.paths)

    def index(self, path: str) -> int:
        """The position of an argument in the flat list, by its path ("bias.dense", "c.seg")."""
        return self._index[path]

    def flatten(self, *values) -> tuple:
        """One value per group (tensors, scalars, parameter objects) -> the op's flat arguments."""
        return self._flatten(*values)

    def unflatten(self, args: Sequence) -> list:
        """The op's flat arguments -> one value per group (the parameter objects rebuilt)."""
        return self._unflatten(args)

    def _compile(self) -> None:
        """flatten and unflatten as two generated functions (one attribute read or one index per leaf): they
        run on every op call."""
        names = [f"g{i}" for i in range(len(self._groups))]
        getters, builders, classes, start = [], [], {}, 0
        for var, (_, fields) in zip(names, self._groups):
            getters += [var] if fields is None else fields.getters(var)
            if fields is None:
                builders.append(f"a[{start}]")
                start += 1
            else:
                expr, start = fields.builder("a", start, classes)
                builders.append(expr)
        source = (f"def flatten({', '.join(names)}):\n    return ({', '.join(getters)},)\n"
                  f"def unflatten(a):\n    return [{', '.join(builders)}]\n")
        scope = dict(classes, _made=made)  # unflatten rebuilds what flatten took apart: no __init__ needed
        exec(compile(source, f"<OpArgs {self.paths[:3]}...>", "exec"), scope)
        self._flatten, self._unflatten = scope["flatten"], scope["unflatten"]

    def call(self, op, *values):
        """Call the custom op with one value per group (flattened here): through torch.library, or straight to
        the op's own function with these values when the dispatcher has nothing to do (ops/_fast_path.py)."""
        args = self.flatten(*values)
        return op.grouped(*values) if _fast_path.skips_dispatch(args) else op(*args)

    def grads(self, by_path: Dict[str, Optional[Tensor]]) -> tuple:
        """What an autograd formula returns: the given gradients at their arguments' places, None elsewhere."""
        out: List[Optional[Tensor]] = [None] * len(self.paths)
        for path, g in by_path.items():
            out[self._index[path]] = g
        return tuple(out)

    def save(self, ctx, args: Sequence, *outputs: Tensor) -> None:
        """Keep every argument and the given outputs for the backward: the tensors through save_for_backward,
        the rest on ctx."""
        ctx.save_for_backward(*outputs, *[a for a, t in zip(args, self.types) if _holds_tensor(t)])
        ctx.op_scalars = [a for a, t in zip(args, self.types) if not _holds_tensor(t)]
        ctx.op_outputs = len(outputs)

    def saved(self, ctx) -> Tuple[tuple, list]:
        """(the outputs, the arguments unflattened) kept by `save`."""
        saved = ctx.saved_tensors
        tensors, scalars = iter(saved[ctx.op_outputs:]), iter(ctx.op_scalars)
        args = [next(tensors) if _holds_tensor(t) else next(scalars) for t in self.types]
        return saved[:ctx.op_outputs], self.unflatten(args)

    def signature(self, returns) -> inspect.Signature:
        kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
        return inspect.Signature([inspect.Parameter(p.replace(".", "_"), kind, annotation=t)
                                  for p, t in zip(self.paths, self.types)], return_annotation=returns)

    def custom_op(self, name: str, returns) -> Callable:
        """torch.library.custom_op(name) for `fn(*groups)`, which receives the unflattened arguments; the
        schema is this argument list's."""

        def define(fn: Callable):
            def flat(*args):
                return fn(*self.unflatten(args))

            flat.__signature__ = self.signature(returns)
            flat.__name__, flat.__qualname__, flat.__doc__ = fn.__name__, fn.__qualname__, fn.__doc__
            op = torch.library.custom_op(name, flat, mutates_args=())
            op.kernel, op.grouped = flat, fn  # for the fast path: `_fast_path.call(op, *args)` and `call`
            return op

        return define

    def register_fake(self, op) -> Callable:
        """op.register_fake for `fn(*groups)`."""

        def define(fn: Callable):
            op.register_fake(lambda *args: fn(*self.unflatten(args)))
            return fn

        return define


def _holds_tensor(t) -> bool:
    return t is Tensor or t == Optional[Tensor]
