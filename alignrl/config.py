"""Recipe location and the checks that run before any model loads."""

from __future__ import annotations

import functools
import os
from importlib import resources
from pathlib import Path

from omegaconf import DictConfig

from alignrl.errors import ConfigError

GROUPS = ("backbone", "sampler", "reward", "algorithm", "trainer", "data", "logger", "launcher", "distributed",
          "recipe")


def recipes_dir() -> Path:
    """The recipes folder: ``recipes/`` of the repository, shipped as the ``alignrl.recipes`` package.

    A wheel install finds it as that package; an editable install (whose import hook maps only the
    top-level package) finds it beside the ``alignrl`` source folder.
    """
    try:
        return Path(str(resources.files("alignrl.recipes")))
    except ModuleNotFoundError:
        source = Path(__file__).resolve().parent.parent / "recipes"
        if (source / "config.yaml").is_file():
            return source
        raise


CONFIG_PATH_ENV = "ALIGNRL_CONFIG_PATH"


def user_config_dirs() -> list[Path]:
    """Config directories of the user's own (``ALIGNRL_CONFIG_PATH``, separated by ``os.pathsep``), laid out like
    ``recipes/`` (``algorithm/``, ``recipe/``, ``reward/`` ...): their files join the shipped options, so a method,
    reward or recipe of one's own needs no edit inside the package. A shipped file of the same name wins."""
    dirs = []
    for part in os.environ.get(CONFIG_PATH_ENV, "").split(os.pathsep):
        if not part.strip():
            continue
        d = Path(part.strip()).expanduser().resolve()
        if not d.is_dir():
            raise ConfigError(f"{CONFIG_PATH_ENV} names '{part}', which is not a directory; fix or unset it")
        dirs.append(d)
    return dirs


def config_dirs() -> list[Path]:
    """Where config options are found, in Hydra's search order: the shipped recipes, then the user's."""
    return [recipes_dir(), *user_config_dirs()]


def searchpath_override() -> list[str]:
    """The Hydra override that adds the user's config directories (none when ``ALIGNRL_CONFIG_PATH`` is unset)."""
    dirs = user_config_dirs()
    return [f"hydra.searchpath=[{','.join('file://' + str(d) for d in dirs)}]"] if dirs else []


def option_file(group: str, option: str) -> Path | None:
    """The YAML file of ``group=option`` (the first in search order), or None."""
    for d in config_dirs():
        f = d / group / f"{option}.yaml"
        if f.is_file():
            return f
    return None


def group_options(group: str) -> list[str]:
    names = set()
    for d in config_dirs():
        if (d / group).is_dir():
            names.update(p.stem for p in (d / group).glob("*.yaml"))
    return sorted(names)


def recipe_descriptions() -> list[tuple[str, str]]:
    """(name, one-line description) of every recipe, from its ``description:`` line."""
    import yaml

    out = []
    for name in group_options("recipe"):
        text = option_file("recipe", name).read_text(encoding="utf-8")
        desc = ""
        try:
            desc = str((yaml.safe_load(text) or {}).get("description", ""))
        except yaml.YAMLError as e:
            desc = f"(unreadable: {e})"
        out.append((name, desc.strip().splitlines()[0] if desc.strip() else ""))
    return out


DEFAULT_RECIPE_ENV = "ALIGNRL_DEFAULT_RECIPE"


def default_recipe_override(overrides: list[str]) -> str | None:
    """``recipe=<name>`` for the environment variable ``ALIGNRL_DEFAULT_RECIPE`` (a lab's own default; the test suite
    pins the tiny one) when the overrides name no recipe; None keeps ``recipes/config.yaml``'s (``tiny_flowgrpo``)."""
    name = os.environ.get(DEFAULT_RECIPE_ENV, "").strip()
    if not name or any(o.lstrip("+").startswith("recipe=") for o in overrides):
        return None
    return f"recipe={name}"


def expand_reward_weights(overrides: list[str]) -> list[str]:
    """``reward={pickscore: 1.0, ocr: 0.5}`` -> ``reward=[pickscore,ocr] reward.pickscore.weight=1.0 ...``.

    ``reward`` is a config group, so Hydra cannot take a dict for it; this spelling is expanded before
    Hydra sees the overrides. ``reward.<name>.frames=`` and ``reward.<name>.frame_stride=`` (how any reward scores
    videos; its YAML need not list them) are set as Hydra's ``++`` upserts. Other overrides pass through unchanged.
    """
    out = []
    for ov in overrides:
        key, _, value = ov.partition("=")
        value = value.strip()
        parts = key.strip().split(".")
        if len(parts) == 3 and parts[0] == "reward" and parts[2] in ("frames", "frame_stride"):
            out.append(f"++{key.strip()}={value}")
            continue
        if key.strip() != "reward" or not (value.startswith("{") and value.endswith("}")):
            out.append(ov)
            continue
        names, weights = [], []
        for item in filter(None, (x.strip() for x in value[1:-1].split(","))):
            name, sep, weight = (x.strip() for x in item.partition(":"))
            try:
                float(weight)
            except ValueError:
                raise ConfigError(f"reward weights: '{item}' is not 'name: number'; write e.g. "
                                  f"reward={{pickscore: 1.0, ocr: 0.5}}") from None
            if not sep or not name:
                raise ConfigError(f"reward weights: '{item}' is not 'name: number'; write e.g. "
                                  f"reward={{pickscore: 1.0, ocr: 0.5}}")
            names.append(name)
            weights.append(f"reward.{name}.weight={weight}")
        if not names:
            raise ConfigError("reward={} names no reward; write e.g. reward={pickscore: 1.0, ocr: 0.5}")
        out += [f"reward=[{','.join(names)}]", *weights]
    return out


def check_group_overrides(overrides: list[str]) -> None:
    """Fail fast, in one line, on ``group=option`` overrides that name no recipe file."""
    for ov in overrides:
        if "=" not in ov or ov.startswith(("hydra.", "hydra/", "+", "~", "-")):
            continue
        key, value = ov.split("=", 1)
        key = key.removeprefix("override ").strip()
        if key not in GROUPS or value in ("null", "") or value.startswith("{"):
            continue
        if value.startswith("[") and value.endswith("]"):  # several options of one group (rewards)
            values = [v.strip() for v in value[1:-1].split(",") if v.strip()]
        elif "," in value:  # a sweep (-m): Hydra reports its own errors
            continue
        else:
            values = [value]
        options = group_options(key)
        for v in values:
            if v not in options:
                raise ConfigError(f"unknown {key} '{v}'; valid: {', '.join(options)}")


def _positive_int(value, name: str) -> int:
    try:
        v = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be an integer, got {value!r}") from None
    if v < 1:
        raise ConfigError(f"{name} must be >= 1, got {v}")
    return v


def _branching_sampler(cfg: DictConfig) -> bool:
    """Trees, side branches and branched Flow-GRPO-Fast: one root per prompt already gives a group."""
    sampler = cfg.get("sampler") or {}
    return bool(sampler.get("branch_factor") or sampler.get("children") or sampler.get("branched"))


def _batch_kind(cfg: DictConfig) -> str | None:
    from alignrl.components import algorithm_class

    return getattr(algorithm_class(cfg), "batch_kind", None)


def _splits_transitions(cfg: DictConfig) -> bool:
    """Whether the algorithm's per-step transitions may go to different optimizer steps (the GRPO family; not
    D3PO, whose loss pairs the transitions of one root, nor DPOK's replay)."""
    from alignrl.components import algorithm_class

    cls = algorithm_class(cfg)
    return _batch_kind(cfg) == "transitions" and not _replay_algorithm(cfg) and \
        bool(getattr(cls, "splits_transitions", True))


def steps_per_pass(cfg: DictConfig) -> int:
    """The schedule steps a training forward packs: ``trainer.steps_per_pass`` (0: all) where the algorithm's
    per-step transitions train independently (``_splits_transitions``), else 1 (D3PO's pairs share a step; the
    other methods have no per-step passes)."""
    return int(cfg.trainer.get("steps_per_pass", 1)) if _splits_transitions(cfg) else 1


def offline_algorithm(cfg: DictConfig) -> bool:
    """Whether the recipe's algorithm trains on an offline dataset (``data.offline``) rather than rollouts."""
    from alignrl.algorithms.base import OFFLINE_KINDS

    return _batch_kind(cfg) in OFFLINE_KINDS


def _group_free_algorithm(cfg: DictConfig) -> bool:
    """Whether the algorithm takes groups of one: it normalises nothing within a group (reward-gradient methods,
    DPOK's value baseline), or keeps a per-prompt reward history across iterations (DDPO's tracker:
    ``algorithm.stat_buffer_size > 0``)."""
    from alignrl.algorithms.base import PROMPT_KINDS

    return (_batch_kind(cfg) in PROMPT_KINDS or int(cfg.algorithm.get("stat_buffer_size") or 0) > 0
            or _replay_algorithm(cfg))


def _replay_algorithm(cfg: DictConfig) -> bool:
    """Whether the algorithm's updates draw from a replay buffer (DPOK) rather than split the iteration's samples."""
    from alignrl.components import algorithm_class

    return bool(getattr(algorithm_class(cfg), "replay", False))


OFFLINE_KEYS = ("path", "rows_per_iteration", "balance", "balance_power", "min_score", "root", "drop_ties",
                "latent_cache")  # data.offline's settings (README: the preference family)


def _offline_layout(cfg: DictConfig, world_size: int) -> dict:
    offline = cfg.data.get("offline") or {}
    unknown = sorted(set(offline) - set(OFFLINE_KEYS))
    if unknown:
        import difflib

        close = difflib.get_close_matches(unknown[0], OFFLINE_KEYS, n=1, cutoff=0.6)
        raise ConfigError(f"data.offline.{unknown[0]} is not a setting of data.offline"
                          + (f"; did you mean data.offline.{close[0]}?" if close else
                             f"; its settings are {', '.join(OFFLINE_KEYS)}"))
    rows = _positive_int(offline.get("rows_per_iteration"), "data.offline.rows_per_iteration")
    world = _positive_int(world_size, "world size")
    rollout_bs = _positive_int(cfg.trainer.rollout_batch_size, "trainer.rollout_batch_size")
    train_bs = _positive_int(cfg.trainer.train_batch_size, "trainer.train_batch_size")
    updates = _positive_int(cfg.trainer.updates_per_iteration, "trainer.updates_per_iteration")
    _positive_int(cfg.trainer.max_steps, "trainer.max_steps")
    if rows % world:
        raise ConfigError(f"data.offline.rows_per_iteration={rows} does not split over {world} processes; make it a "
                          f"multiple of {world}")
    per_rank = rows // world
    if per_rank % (updates * train_bs) and not _replay_algorithm(cfg):
        raise ConfigError(f"each process trains on {per_rank} dataset rows per iteration, not a multiple of "
                          f"trainer.updates_per_iteration x trainer.train_batch_size = {updates} x {train_bs}; "
                          f"choose them so their product divides {per_rank}")
    return {"samples_per_rank": per_rank, "rollout_batch_size": rollout_bs, "train_batch_size": train_bs,
            "updates_per_iteration": updates, "world_size": world}


def validate_batch_arithmetic(cfg: DictConfig, world_size: int, num_prompts: int | None = None) -> dict:
    """Check that groups, ranks and batches divide; return the per-rank layout."""
    update_by = str(cfg.trainer.get("update_by", "samples"))
    if update_by != "samples" and not _splits_transitions(cfg):
        raise ConfigError(f"trainer.update_by={update_by} splits per-step transitions; algorithm "
                          f"'{cfg.algorithm.name}' does not train on them independently: use trainer.update_by=samples")
    if offline_algorithm(cfg):
        return _offline_layout(cfg, world_size)
    groups = _positive_int(cfg.data.groups_per_iteration, "data.groups_per_iteration")
    k = _positive_int(cfg.algorithm.group_size, "algorithm.group_size")
    if k < 2 and not _branching_sampler(cfg) and not _group_free_algorithm(cfg):
        raise ConfigError("algorithm.group_size must be >= 2: a group of one has no relative advantage "
                          "(only branching samplers, whose branches form the group, and per-prompt reward trackers "
                          "(algorithm.stat_buffer_size > 0) take 1)")
    world = _positive_int(world_size, "world size")
    rollout_bs = _positive_int(cfg.trainer.rollout_batch_size, "trainer.rollout_batch_size")
    train_bs = _positive_int(cfg.trainer.train_batch_size, "trainer.train_batch_size")
    updates = _positive_int(cfg.trainer.updates_per_iteration, "trainer.updates_per_iteration")
    _positive_int(cfg.trainer.max_steps, "trainer.max_steps")
    total = groups * k
    if total % world:
        raise ConfigError(
            f"data.groups_per_iteration x algorithm.group_size = {groups} x {k} = {total} samples do not split "
            f"over {world} processes; make the product a multiple of {world}"
        )
    per_rank = total // world
    if per_rank % rollout_bs:
        raise ConfigError(
            f"each process samples {per_rank} images per iteration ({total} / {world}), not a multiple of "
            f"trainer.rollout_batch_size={rollout_bs}; pick a divisor of {per_rank}"
        )
    if update_by == "samples" and per_rank % (updates * train_bs) and not _replay_algorithm(cfg):
        raise ConfigError(
            f"each process trains on {per_rank} samples per iteration, not a multiple of "
            f"trainer.updates_per_iteration x trainer.train_batch_size = {updates} x {train_bs}; "
            f"choose them so their product divides {per_rank}"
        )
    if num_prompts is not None and groups > num_prompts:
        raise ConfigError(
            f"data.groups_per_iteration={groups} exceeds the {num_prompts} training prompts; lower it"
        )
    return {"samples_per_rank": per_rank, "rollout_batch_size": rollout_bs, "train_batch_size": train_bs,
            "updates_per_iteration": updates, "world_size": world}


def compose(overrides: list[str] | None = None, config_name: str = "config") -> DictConfig:
    """Compose the config as the CLI would (for notebooks, scripts and tests).

    ``run_dir`` refers to Hydra's runtime; pass ``run_dir=<path>`` when the result will be resolved.
    """
    from hydra import compose as hydra_compose, initialize_config_dir

    overrides = list(overrides or [])
    default = default_recipe_override(overrides)
    overrides = expand_reward_weights(([default] if default else []) + overrides)
    check_group_overrides(overrides)
    with initialize_config_dir(config_dir=str(recipes_dir()), version_base=None):
        return hydra_compose(config_name=config_name, overrides=searchpath_override() + overrides)


# ---------------------------------------------------------------------------------------- values
def config_leaves(node, prefix: str = ""):
    """(dotted key, value) of every leaf of a config, interpolations that cannot resolve yet skipped."""
    from omegaconf import DictConfig, ListConfig

    items = node.items_ex(resolve=False) if isinstance(node, DictConfig) else enumerate(node)
    for k, _ in items:
        key = f"{prefix}{k}"
        try:
            value = node[k]
        except Exception:  # noqa: BLE001  an interpolation of Hydra's runtime (run_dir): not a number anyway
            continue
        if isinstance(value, (DictConfig, ListConfig)):
            yield from config_leaves(value, key + ".")
        else:
            yield key, value


def check_finite(cfg: DictConfig) -> None:
    """Every number in the config is finite (``lr=inf`` would train to NaN weights and exit 0)."""
    import math

    for key, value in config_leaves(cfg):
        if key.startswith("hydra."):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}={value} is not a finite number; give a finite value")


def _overridden(overrides: list[str]) -> list[tuple[str, str]]:
    """(key, override) of the plain ``key=value`` overrides (group choices, additions and deletions excluded)."""
    out = []
    for ov in overrides:
        if "=" not in ov or ov.startswith(("hydra.", "hydra/", "+", "~")):
            continue
        key = ov.split("=", 1)[0].strip()
        if key not in GROUPS:
            out.append((key, ov))
    return out


def _type_error(key: str, default, value) -> str | None:
    """A value of another kind than the default's (``seed=abc``, ``algorithm.lr=fast``), or None."""
    if default is None or value is None:
        return None
    if isinstance(default, bool):
        return None if isinstance(value, bool) else f"{key}={value!r} must be true or false"
    if isinstance(default, (int, float)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"{key}={value!r} must be a number"
        if key == "seed" and not float(value).is_integer():
            return f"seed={value!r} must be an integer"
    return None


def _config_files_state() -> tuple:
    """Every config file Hydra can read (the shipped recipes and the user's directories) with its modification time:
    a cached composition is reused only while none of them changed."""
    return tuple((str(f), f.stat().st_mtime_ns) for d in config_dirs() for f in sorted(d.rglob("*.yaml")))


@functools.lru_cache(maxsize=64)
def _compose_cached(groups_only: tuple[str, ...], *environment) -> DictConfig:
    """``compose(groups_only)``, kept per process; ``environment`` (what ``compose`` reads besides its arguments)
    only keys the cache."""
    return compose(list(groups_only))


def _composed_defaults(groups_only: list[str]) -> DictConfig:
    """The config that the group choices alone compose to: the defaults against which ``precheck_overrides`` checks
    the type of each plain override. Kept per process (read only), keyed by the choices, the environment that
    ``compose`` reads and the config files' state: a process that runs several commands (a notebook, a sweep's
    driver, the test suite's in-process runs) composes the same choices again and again, about 0.1 s each."""
    return _compose_cached(tuple(groups_only), os.environ.get(DEFAULT_RECIPE_ENV, ""),
                           os.environ.get(CONFIG_PATH_ENV, ""), _config_files_state())


def precheck_overrides(overrides: list[str]) -> None:
    """Before Hydra runs a command: overrides that compose, name keys that exist (a misspelt one names the closest
    valid keys rather than Hydra's ``+key=value`` hint, which would run with the typo), carry values of the
    default's type, and finite numbers. Raises ``ConfigError`` with one line."""
    import difflib

    from hydra.errors import ConfigCompositionException, OverrideParseException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        cfg = compose(overrides)
    except OverrideParseException as e:
        first, _, rest = str(e).partition("\n")
        detail = rest.splitlines()[0] if rest.strip() else ""
        raise ConfigError(f"{first.removeprefix('Error parsing override ')}: {detail}; quote a value that holds "
                          f"spaces or quotes as a whole, e.g. 'check.prompts=\"a sign that says HELLO\"'") from None
    except ConfigCompositionException as e:
        import re

        m = re.search(r"Could not override '([^']+)'", str(e))
        if not m:
            raise ConfigError(str(e).splitlines()[0]) from None
        key = m.group(1)
        if key.startswith("data.offline.") and key.removeprefix("data.offline.") in OFFLINE_KEYS:
            raise ConfigError(f"'{key}' is an optional setting this recipe leaves out; add it with "
                              f"+{key}=VALUE") from None
        base = compose([ov for ov in overrides if not ov.startswith(key + "=")])
        known = [k for k, _ in config_leaves(base) if not k.startswith("hydra.")]
        close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
        hint = f"did you mean {' or '.join(close)}?" if close else \
            "check the spelling (alignrl train --cfg job prints every key)"
        raise ConfigError(f"'{key}' is not a config key; {hint}") from None
    except (OmegaConfBaseException, ValueError) as e:
        raise ConfigError(f"the overrides do not compose: {str(e).splitlines()[0]}") from None
    plain = _overridden(overrides)
    if plain:
        base = _composed_defaults([ov for ov in overrides if ov not in {o for _, o in plain}])
        for key, _ in plain:
            default = OmegaConf.select(base, key, default=None, throw_on_resolution_failure=False)
            value = OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)
            problem = _type_error(key, default, value)
            if problem:
                raise ConfigError(problem)
    check_finite(cfg)
