"""``alignrl train | eval | sample | serve-reward | recipes``: compose the Hydra config, then dispatch.

Arguments after the command are Hydra overrides (``recipe=flowgrpo_sd35 trainer.max_steps=20``) and
Hydra flags (``--cfg job`` prints the resolved config, ``--help`` shows the groups, ``-m`` sweeps).
"""

from __future__ import annotations

import os
import sys

USAGE = """usage: alignrl <command> [overrides...] [hydra flags]

commands:
  train     run a recipe (default recipe: tiny_flowgrpo, CPU, under 2 minutes)
  eval      evaluate a checkpoint (eval.checkpoint=<dir>) or the base model; writes metrics, grid, summary
  sample    generate images from a checkpoint or the base model (sample.prompts=[...])
  export    write a diffusers pipeline (weights merged) and the LoRA adapter: checkpoint=<run|ckpt> out=<dir>
            [weights=ema|live]; without checkpoint=, the recipe's base model
  serve-reward  serve a reward over HTTP for reward=remote clients (port=8000 host=127.0.0.1 token=...)
  reward-check  score a folder of images with a reward before a run (images=<dir|glob> prompts=<file|text>)
  recipes   list the recipes with a one-line description, and every config group's options
  runs      list the runs under outputs/ and multirun/ (or the given dirs): step, last reward and eval,
            state (running, finished, preempted, failed, stale, ...), Slurm job and its state

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
  alignrl serve-reward reward=shapes_geneval port=8000 # a reward server; clients use reward=remote
  alignrl reward-check reward=ocr images=samples/ prompts='a sign that says "HELLO"'

`alignrl <command> --help` lists the config groups and their options.
"""

COMMANDS = ("train", "eval", "sample", "export", "serve-reward", "reward-check")
# bare keys `alignrl serve-reward` accepts for serve.<key>, and `alignrl reward-check` for check.<key>
SERVE_SHORTHANDS = ("port", "host", "token")
CHECK_SHORTHANDS = ("images", "prompts", "out", "batch_size")
EXPORT_SHORTHANDS = ("checkpoint", "out", "weights", "device")
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
              "recipes, runs")
    if command == "serve-reward":
        rest = QUIET + _shorthands(rest, SERVE_SHORTHANDS, "serve")
    elif command == "reward-check":
        rest = QUIET + _shorthands(rest, CHECK_SHORTHANDS, "check")
    elif command == "export":
        rest = _shorthands(rest, EXPORT_SHORTHANDS, "export")
        rest = QUIET + (_on_run_config(rest) if _names_checkpoint(rest, "export.checkpoint") else rest)
    elif command in ("eval", "sample") and _names_checkpoint(rest, "eval.checkpoint"):
        rest = QUIET + _on_run_config(rest)  # the outputs go into the checkpoint's run directory: no new one

    from alignrl.config import check_group_overrides, expand_reward_weights
    from alignrl.errors import AlignError

    try:
        rest = expand_reward_weights(rest)
        check_group_overrides(rest)
    except AlignError as e:
        _fail(str(e))
    _run_hydra(command, rest)


def _names_checkpoint(overrides: list[str], key: str) -> bool:
    return any(o.startswith(key + "=") and o.split("=", 1)[1] not in ("", "null") for o in overrides)


# sections whose keys belong to the command, not to the run a checkpoint comes from
COMMAND_SECTIONS = ("eval.", "sample.", "export.", "check.", "serve.", "hydra.", "hydra/")


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


def _shorthands(overrides: list[str], keys: tuple[str, ...], section: str) -> list[str]:
    """Bare ``key=value`` for the command's own keys -> ``<section>.key=value``."""
    out = []
    for ov in overrides:
        key = ov.split("=", 1)[0]
        out.append(f"{section}.{ov}" if "=" in ov and key in keys else ov)
    return out


def _run_hydra(command: str, overrides: list[str]) -> None:
    import hydra

    from alignrl.config import recipes_dir

    os.environ.setdefault("HYDRA_FULL_ERROR", "0")

    @hydra.main(version_base=None, config_path=str(recipes_dir()), config_name="config")
    def _task(cfg):
        _dispatch(command, cfg)

    sys.argv = [f"alignrl-{command}", *overrides]
    _task()


def _dispatch(command: str, cfg) -> None:
    from alignrl.errors import AlignError

    try:
        if command == "train":
            from alignrl.commands import train

            code = train(cfg)
        elif command == "eval":
            from alignrl.commands import evaluate

            code = evaluate(cfg)
        elif command == "serve-reward":
            from alignrl.rewards.server import serve

            code = serve(cfg)
        elif command == "reward-check":
            from alignrl.rewards.check import run

            code = run(cfg)
        elif command == "export":
            from alignrl.export import export

            code = export(cfg)
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
