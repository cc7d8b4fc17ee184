"""The one place where slimtorch hooks into a module's forward.

Two kinds, for two jobs:

* :class:`TemporaryHooks`: plain PyTorch forward / pre-forward hooks that live for one block of code
  (``with TemporaryHooks() as hooks: hooks.before(layer, fn); model(x)``) and are removed on the way
  out, error or not. Calibration statistics, input capture, shape probes and feature taps use them.
* :class:`ModuleHook` with :func:`attach` / :func:`detach` / :func:`reset_state`: a named, stateful hook
  that stays on a module until detached and may replace its forward (``new_forward``). Feature caching
  needs this: a cached block skips its computation and returns what it stored, and a new sampling run
  must clear what was stored (``reset_state``). Several hooks may sit on one module; each wraps the
  forward of the one attached before it, except that a hook which replaces the computation
  (``replaces_forward``: it never calls the forward it wraps) always sits innermost, so that the others'
  ``pre_forward`` / ``post_forward`` still see every call whatever the attach order (a timestep-reading
  hook under a feature cache, say). One such hook per module.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torch import nn

from slimtorch.errors import SlimError

_ATTACHED = "_slimtorch_hooks"  # the module's own dict: name -> ModuleHook, in attach order


class TemporaryHooks:
    """Forward hooks removed together when the ``with`` block ends (or at :meth:`remove`)."""

    def __init__(self) -> None:
        self._handles: list = []

    def before(self, module: nn.Module, fn: Callable, with_kwargs: bool = False) -> None:
        """``fn(module, args)`` (``fn(module, args, kwargs)`` with ``with_kwargs``) before each forward;
        a non-None return replaces the arguments, as in ``register_forward_pre_hook``."""
        self._handles.append(module.register_forward_pre_hook(fn, with_kwargs=with_kwargs))

    def after(self, module: nn.Module, fn: Callable) -> None:
        """``fn(module, args, output)`` after each forward; a non-None return replaces the output."""
        self._handles.append(module.register_forward_hook(fn))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> TemporaryHooks:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


class ModuleHook:
    """A named hook that stays on a module. Subclasses override :meth:`pre_forward` /
    :meth:`post_forward` to edit inputs and outputs, or :meth:`new_forward` to replace the computation
    (``forward`` is the wrapped module's forward, or the next hook's), and :meth:`reset_state` to drop
    what they keep between calls."""

    name = "hook"
    replaces_forward = False  # True: new_forward computes the output itself, without the wrapped forward

    def pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return args, kwargs

    def post_forward(self, module: nn.Module, output):
        return output

    def new_forward(self, module: nn.Module, forward: Callable, *args, **kwargs):
        args, kwargs = self.pre_forward(module, args, kwargs)
        return self.post_forward(module, forward(*args, **kwargs))

    def reset_state(self, module: nn.Module) -> None:
        """Forget what was kept between calls (a cache, a call counter)."""


def attached(module: nn.Module) -> dict[str, ModuleHook]:
    """The hooks attached to ``module`` by name, in attach order (a copy)."""
    return dict(module.__dict__.get(_ATTACHED, {}))


def attach(module: nn.Module, hook: ModuleHook) -> ModuleHook:
    """Attach ``hook`` to ``module`` under ``hook.name`` (one hook per name); returns it."""
    hooks = module.__dict__.setdefault(_ATTACHED, {})
    if hook.name in hooks:
        raise SlimError(f"a hook named {hook.name!r} is already attached to this {type(module).__name__}; "
                        "detach it first")
    replacing = next((n for n, h in hooks.items() if h.replaces_forward), None)
    if hook.replaces_forward and replacing is not None:
        raise SlimError(f"hook {hook.name!r} replaces the forward of this {type(module).__name__}, and "
                        f"{replacing!r} already does; detach it first")
    hooks[hook.name] = hook
    _rewire(module)
    return hook


def detach(module: nn.Module, name: str) -> ModuleHook:
    """Remove the hook called ``name`` from ``module`` and return it; the original forward is back once
    the last hook is gone."""
    hooks = module.__dict__.get(_ATTACHED, {})
    if name not in hooks:
        raise SlimError(f"no hook named {name!r} is attached to this {type(module).__name__}")
    hook = hooks.pop(name)
    _rewire(module)
    return hook


def reset_state(model: nn.Module) -> int:
    """Call ``reset_state`` on every hook attached anywhere in ``model``; returns how many."""
    count = 0
    for m in model.modules():
        for hook in m.__dict__.get(_ATTACHED, {}).values():
            hook.reset_state(m)
            count += 1
    return count


def _rewire(module: nn.Module) -> None:
    """Point the instance-level forward at the hook chain, or back at the class's forward."""
    hooks = module.__dict__.get(_ATTACHED, {})
    if hooks:
        module.__dict__["forward"] = _HookedForward(module)
    else:
        module.__dict__.pop("forward", None)
        module.__dict__.pop(_ATTACHED, None)


class _HookedForward:
    """The class's forward wrapped by the replacing hook (if any), then by the others in attach order. An
    object rather than a closure so that ``copy.deepcopy`` of a hooked model gives the copy a forward of
    its own."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, *args, **kwargs):
        module = self.module
        forward = type(module).forward.__get__(module)
        hooks = module.__dict__[_ATTACHED].values()
        for hook in sorted(hooks, key=lambda h: not h.replaces_forward):  # stable: attach order otherwise
            forward = partial(hook.new_forward, module, forward)
        return forward(*args, **kwargs)
