"""Import a component by its dotted path (``_target_``), with a one-line error naming the config key."""

from __future__ import annotations

from alignrl.errors import ConfigError


def locate(path: str, key: str = "_target_"):
    """The object at ``path`` (``a.b.C`` or ``a.b:C``); a ConfigError naming ``key`` when it cannot be imported."""
    import importlib

    module, sep, name = path.partition(":")
    if not sep:
        module, _, name = path.rpartition(".")
    if not module or not name:
        raise ConfigError(f"{key}='{path}' is not an import path; write package.module.Class")
    try:
        obj = importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(f"{key}='{path}': cannot import module '{module}' ({e}); is its package installed?") from None
    try:
        for part in name.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        raise ConfigError(f"{key}='{path}': module '{module}' has no '{name}'") from None
    return obj
