"""``alignrl train | eval | sample | serve-reward | recipes``: compose the Hydra config, then dispatch.

Arguments after the command are Hydra overrides (``recipe=flowgrpo_sd35 trainer.max_steps=20``) and
Hydra flags (``--cfg job`` prints the resolved config, ``--help`` shows the groups, ``-m`` sweeps).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

USAGE = """usage: alignrl <command> [overrides...] [hydra flags]

commands:
  train     run a recipe (default: tiny_flowgrpo, CPU, under 2 minutes; ALIGNRL_DEFAULT_RECIPE=<name>
            sets another)
  eval      evaluate a checkpoint (eval.checkpoint=<dir>) or the base model; writes metrics, grid, summary
  sample    generate images from a checkpoint or the base model (sample.prompts=[...])
  export    write a diffusers pipeline (weights merged) and the LoRA adapter: checkpoint=<run|ckpt> out=<dir>
            [weights=ema|live]; without checkpoint=, the recipe's base model
  serve-reward  serve a reward over HTTP for reward=remote clients (port=8000 host=127.0.0.1 token_file=...;
            another host needs a token, or --insecure)
  reward-check  score a folder of images with a reward before a run (images=<dir|glob> prompts=<file|text>)
  data      a dataset for the offline methods from a model and a reward: out=<dir> kind=pairs|lists|labels|
            captions [samples_per_prompt=8 checkpoint=<run|ckpt> pairing=best_worst|all margin=0 num_prompts=N];
            or derive pairs|labels|captions from any earlier run's scores: from_lists=<dir|lists.jsonl>;
            or import a Hugging Face dataset: source=<hub id|dir> [split=train limit=N] (Pick-a-Pic layout)
  plan      per-GPU memory of a recipe on a machine (machine.gpus=8 machine.gpu_memory_gb=80 machine.nodes=1):
            weights, gradients, optimizer, reference, EMA, encoders, activations; whether it fits and what would
  recipes   list the recipes with a one-line description, and every config group's options
  runs      list the runs under outputs/ and multirun/ (or the given dirs): step, last reward and eval,
            state (running, finished, preempted, failed, stale, ...), Slurm job and its state;
            --plot [out.png]: their reward curves on one chart

examples:
  alignrl train
  alignrl train recipe=tiny_flowgrpo_flux trainer.max_steps=10
  alignrl train recipe=flowgrpo_sd35_geneval launcher.nproc_per_node=8
  alignrl train run_dir=outputs/my_run resume=auto
  alignrl eval eval.checkpoint=outputs/tiny_flowgrpo/<run>
  alignrl export checkpoint=outputs/tiny_flowgrpo/<run> out=exported/my_model
  alignrl train recipe=flowgrpo_sd35 --cfg job        # print the resolved config
  alignrl train launcher=slurm launcher.nodes=2 launcher.gpus_per_node=8 launcher.time=240  # submit to Slurm
  alignrl train -m launcher=slurm algorithm.lr=1e-5,3e-5  # one Slurm job per point
  alignrl runs outputs
  alignrl runs --plot runs.png outputs                # reward curves of the runs on one chart
  alignrl serve-reward reward=shapes_geneval port=8000 # a reward server; clients use reward=remote
  alignrl reward-check reward=ocr images=samples/ prompts='a sign that says "HELLO"'
  alignrl data recipe=shapes_flowgrpo out=data/shapes_pairs kind=pairs samples_per_prompt=8
  alignrl data kind=labels from_lists=data/shapes_lists  # KTO's labels from the same scored images
  alignrl data source=yuvalkirstain/pickapic_v2 kind=pairs out=data/pickapic limit=100000

`alignrl <command> --help` lists the config groups and their options.
"""

COMMANDS = ("train", "eval", "sample", "export", "serve-reward", "reward-check", "data", "plan")
# bare keys `alignrl serve-reward` accepts for serve.<key>, and `alignrl reward-check` for check.<key>
SERVE_SHORTHANDS = ("port", "host", "token", "token_file")
CHECK_SHORTHANDS = ("images", "prompts", "out", "batch_size")
EXPORT_SHORTHANDS = ("checkpoint", "out", "weights", "device")
DATA_SHORTHANDS = ("out", "kind", "checkpoint", "weights", "samples_per_prompt", "pairing", "margin", "label_fraction", "captions", "ranks",
                   "guidance_scale",
                   "prompts", "num_prompts", "batch_size", "progress", "source", "split", "limit", "from_lists")
# commands that write no run directory or Hydra log file
QUIET = ["hydra.output_subdir=null", "hydra.run.dir=.", "hydra/job_logging=none", "hydra/hydra_logging=none"]


def _fail(message: str, code: int = 2) -> None:
    print(f"alignrl: error: {message}", file=sys.stderr)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    command, rest = argv[0], argv[1:]
    if command == "recipes":
        print_recipes()
        return
    if command == "runs":
        from alignrl.runs import list_runs

        sys.exit(list_runs(rest))
    if command not in COMMANDS:
        _fail(f"unknown command '{command}'; use one of train, eval, sample, export, serve-reward, reward-check, "
              "data, plan, recipes, runs")
    if command == "serve-reward":
        rest = ["serve.insecure=true" if a == "--insecure" else a for a in rest]
        rest = QUIET + _shorthands(rest, SERVE_SHORTHANDS, "serve")
    elif command == "reward-check":
        rest = QUIET + _shorthands(rest, CHECK_SHORTHANDS, "check", quote=("images", "prompts", "out"))
    elif command == "export":
        rest = _shorthands(rest, EXPORT_SHORTHANDS, "export", quote=("checkpoint", "out"))
        rest = QUIET + (_on_run_config(rest) if _names_checkpoint(rest, "export.checkpoint") else rest)
    elif command == "data":
        rest = _shorthands(rest, DATA_SHORTHANDS, "datagen", quote=("checkpoint", "out", "prompts", "source", "from_lists"))
        rest = QUIET + (_on_run_config(rest) if _names_checkpoint(rest, "datagen.checkpoint") else rest)
    elif command == "plan":
        rest = QUIET + rest
    elif command in ("eval", "sample") and _names_checkpoint(rest, "eval.checkpoint"):
        rest = QUIET + _on_run_config(rest)  # the outputs go into the checkpoint's run directory: no new one
    if not any(_names_checkpoint(rest, k) for k in ("eval.checkpoint", "export.checkpoint", "datagen.checkpoint")):
        rest = _with_default_recipe(rest)

    if "--cfg" in rest and "--resolve" not in rest:
        rest.append("--resolve")  # print values, not ${...} interpolations

    from alignrl.config import check_group_overrides, expand_reward_weights, precheck_overrides
    from alignrl.errors import AlignError

    try:
        rest = expand_reward_weights(rest)
        check_group_overrides(rest)
        if not any(a.startswith("-") for a in rest):  # Hydra's flags (--cfg, -m sweeps) take their own path
            precheck_overrides(rest)
        if command == "train":
            _check_run_dir(rest)
    except AlignError as e:
        _fail(str(e))
    _run_hydra(command, rest)


# Whether the train command's run directory existed before Hydra created it (a failed start removes a new one),
# and its nearest ancestor that did (empty folders created below it go too).
_run_dir_existed: bool | None = None
_run_dir_anchor: Path | None = None


def _check_run_dir(overrides: list[str]) -> None:
    """``run_dir`` must be a directory this user can write (checked before Hydra creates it)."""
    global _run_dir_existed, _run_dir_anchor
    from alignrl.errors import ConfigError

    given = [o.split("=", 1)[1] for o in overrides if o.startswith("run_dir=")]
    path = Path(given[-1].strip("'\"")).expanduser() if given else Path("outputs")
    _run_dir_existed = path.exists() if given else False
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    _run_dir_anchor = probe.resolve()
    key = f"run_dir={given[-1]}" if given else "the default run directory outputs/"
    if probe.exists() and not probe.is_dir():
        raise ConfigError(f"{key}: {probe} is a file, not a directory; choose another run_dir")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}: {probe} is not writable; choose a run_dir you can write")


def _remove_failed_start(run_dir: Path) -> None:
    """A run that failed before it trained leaves no directory behind: when this command created ``run_dir``
    and it holds only what a start writes (Hydra's .hydra/, the log, config.yaml, status.json), remove it."""
    import shutil

    if _run_dir_existed is not False or not run_dir.is_dir():
        return
    from alignrl.runs import read_json

    if read_json(run_dir / "status.json").get("phase") == "train":
        return  # it trained, or failed while training: its status.json holds the error
    start_files = {".hydra", "alignrl.log", "config.yaml", "status.json", "STOP"}
    if not all(p.name in start_files for p in run_dir.iterdir()):
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    parent = run_dir.resolve().parent
    while _run_dir_anchor is not None and parent != _run_dir_anchor and _run_dir_anchor in parent.parents:
        try:
            parent.rmdir()  # only while empty: outputs/<recipe>/ made for this run alone
        except OSError:
            break
        parent = parent.parent


# Hydra's flags that take a value (``--cfg job``); the others (``-m``, ``--resolve``) stand alone
_HYDRA_VALUE_FLAGS = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                      "--config-dir", "-cd", "--info", "-i", "--experimental-rerun"}


def _with_default_recipe(args: list[str]) -> list[str]:
    """``ALIGNRL_DEFAULT_RECIPE``'s recipe (when set and no recipe= is given), placed next to the other overrides:
    Hydra's parser takes the overrides as one run of arguments, so ``-m seed=1,2`` or ``x=1 --cfg job`` must not
    be split by it."""
    from alignrl.config import default_recipe_override

    default = default_recipe_override(args)
    if default is None:
        return args
    positions = [i for i, a in enumerate(args)
                 if not a.startswith("-") and not (i and args[i - 1] in _HYDRA_VALUE_FLAGS)]
    at = positions[0] if positions else len(args)
    return [*args[:at], default, *args[at:]]


def _names_checkpoint(overrides: list[str], key: str) -> bool:
    return any(o.startswith(key + "=") and o.split("=", 1)[1] not in ("", "null") for o in overrides)


# sections whose keys belong to the command, not to the run a checkpoint comes from
COMMAND_SECTIONS = ("eval.", "sample.", "export.", "check.", "serve.", "datagen.", "hydra.", "hydra/")


def _on_run_config(overrides: list[str]) -> list[str]:
    """With a checkpoint, keys are set on the run's saved config, whose groups may hold keys the default recipe
    lacks (``backbone.pretrained`` of a real-weights run): let Hydra add them (``++``); alignrl.policy checks them
    against the run's config."""
    out = []
    for ov in overrides:
        key = ov.split("=", 1)[0]
        plain = "=" in ov and "." in key and not key.startswith(("+", "~", *COMMAND_SECTIONS))
        out.append("++" + ov if plain else ov)
    return out


def _shorthands(overrides: list[str], keys: tuple[str, ...], section: str, quote: tuple[str, ...] = ()) -> list[str]:
    """Bare ``key=value`` for the command's own keys -> ``<section>.key=value``.

    Values of the ``quote`` keys (paths, prompt text) are passed to Hydra as one quoted string, so spaces and
    quotes in them need no Hydra quoting: ``prompts='a sign that says "HELLO"'`` works as a shell user writes it.
    """
    out = []
    for ov in overrides:
        key, _, value = ov.partition("=")
        if "=" not in ov or key not in keys:
            out.append(ov)
        elif key in quote and value and value[0] not in "'\"" and value not in ("null", "None"):
            out.append(f"{section}.{key}='" + value.replace("'", "\\'") + "'")
        else:
            out.append(f"{section}.{ov}")
    return out


def _run_hydra(command: str, overrides: list[str]) -> None:
    import hydra

    from alignrl.config import recipes_dir

    os.environ.setdefault("HYDRA_FULL_ERROR", "0")

    @hydra.main(version_base=None, config_path=str(recipes_dir()), config_name="config")
    def _task(cfg):
        _dispatch(command, cfg)

    from alignrl.config import searchpath_override

    sys.argv = [f"alignrl-{command}", *searchpath_override(), *overrides]
    _task()


def _dispatch(command: str, cfg) -> None:
    from alignrl.errors import AlignError

    try:
        if command == "train":
            from alignrl.commands import train

            try:
                code = train(cfg)
            except BaseException:
                from alignrl.commands import _run_dir

                _remove_failed_start(_run_dir())
                raise
        elif command == "eval":
            from alignrl.commands import evaluate

            code = evaluate(cfg)
        elif command == "plan":
            from alignrl.plan import run as plan

            code = plan(cfg)
        elif command == "serve-reward":
            from alignrl.rewards.server import serve

            code = serve(cfg)
        elif command == "reward-check":
            from alignrl.rewards.check import run

            code = run(cfg)
        elif command == "export":
            from alignrl.export import export

            code = export(cfg)
        elif command == "data":
            from alignrl.datagen import make_dataset

            code = make_dataset(cfg)
        else:
            from alignrl.commands import sample

            code = sample(cfg)
    except AlignError as e:
        _fail(str(e))
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    if code:
        sys.exit(code)


def print_recipes() -> None:
    from alignrl.config import GROUPS, group_options, recipe_descriptions

    rows = recipe_descriptions()
    width = max(len(n) for n, _ in rows)
    print("recipes (alignrl train recipe=<name>):")
    for name, desc in rows:
        print(f"  {name:<{width}}  {desc}")
    print("\nconfig groups (override with <group>=<option>):")
    for g in GROUPS:
        if g != "recipe":
            print(f"  {g:<10} {', '.join(group_options(g))}")


if __name__ == "__main__":
    main()
