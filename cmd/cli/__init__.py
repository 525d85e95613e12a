"""The programs behind the ``cmd-fgvc`` console command (also ``python -m cmd``).

``cmd-fgvc pretrain [--recipe NAME] [options]`` runs self-supervised CMD / EsViT / DINO pretraining
(`cmd.cli.pretrain`); ``cmd-fgvc evaluate knn|linear|retrieval [options]`` evaluates a frozen
backbone (`cmd.cli.evaluate`); ``cmd-fgvc recipes`` lists the training recipes (`cmd.recipes`). ``cmd-fgvc COMMAND --help`` lists every option with its default
(the options and ``--config FILE`` of both commands: `cmd.cli.options`).
Under torchrun: ``torchrun --nproc_per_node 8 -m cmd pretrain ...``.

Example:
    >>> from cmd.cli import main
    >>> main(["--help"])  # doctest: +SKIP
"""

from __future__ import annotations

import sys

__all__ = ["main"]

_COMMANDS = {
    "pretrain": "self-supervised pretraining (CMD, EsViT or DINO losses); writes checkpoints and a log",
    "evaluate": "k-NN, linear probe or retrieval of a frozen backbone: evaluate knn|linear|retrieval",
    "recipes": "list the training recipes of pretrain --recipe NAME (--markdown: the table of every option)",
}


def _recipes(rest: list[str]) -> int:
    """``cmd-fgvc recipes [--markdown]``: one line per recipe, or the Markdown table of docs/recipes.md."""
    from cmd import recipes

    if rest == ["--markdown"]:
        print(recipes.markdown_table(), end="")
        return 0
    if rest:
        print("usage: cmd-fgvc recipes [--markdown]\n\nlists the recipes of cmd-fgvc pretrain --recipe NAME; "
              "--markdown prints the table recipe x option (docs/recipes.md)", file=sys.stdout if
              rest[0] in ("-h", "--help") else sys.stderr)
        return 0 if rest[0] in ("-h", "--help") else 2
    for name in recipes.names():
        recipe = recipes.load(name)
        base = f" (extends {recipe.extends})" if recipe.extends else ""
        print(f"{name:<14} {recipe.description}{base}")
    print("\ndefault without --recipe: demo for --dataset synthetic and digits, paper-cars for cars, paper for the others; "
          "cmd-fgvc pretrain --recipe NAME --print_config shows every value")
    return 0


def _usage() -> str:
    lines = ["usage: cmd-fgvc COMMAND [options]   (or: python -m cmd COMMAND ...)", "", "commands:"]
    lines += [f"  {name:<10} {text}" for name, text in _COMMANDS.items()]
    lines += ["", "cmd-fgvc COMMAND --help lists the options of a command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``cmd-fgvc COMMAND ...`` to the command's program; return the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from cmd._version import __version__

        print(f"cmd-fgvc {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command == "recipes":
        return _recipes(rest)
    if command in _COMMANDS and ("-h" in rest or "--help" in rest):
        # the options live in a module without torch: --help answers at once
        from cmd.cli import options

        build = {"pretrain": options.build_pretrain_parser, "evaluate": options.build_evaluate_parser}[command]
        try:
            build().parse_args(rest)
        except SystemExit as stop:
            return int(stop.code or 0)
    if command == "pretrain":
        from cmd.cli import pretrain

        return pretrain.run(rest)
    if command == "evaluate":
        from cmd.cli import evaluate

        return evaluate.run(rest)
    print(f"cmd-fgvc: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
    return 2
