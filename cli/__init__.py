"""moe.cli: the `moe` command, one module per subcommand, assembled here."""

from __future__ import annotations

import typer

from . import bench, chat, convert, info, list_, perplexity, plan, profile, run, serve, trace, verify
from .errors import execute

app = typer.Typer(
    name="moe",
    help="Run Mixture-of-Experts language models on a laptop CPU: convert a Hugging Face checkpoint into a 4-bit "
    "memory-mapped layout, then run it touching only the experts the router picks.",
    epilog='Example: moe run "def fibonacci(n):"   (the bundled demo model)',
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.command("convert", epilog=convert.EXAMPLE)(convert.convert)
app.command("run", epilog=run.EXAMPLE)(run.run)
app.command("chat", epilog=chat.EXAMPLE)(chat.chat)
app.command("serve", epilog=serve.EXAMPLE)(serve.serve)
app.command("bench", epilog=bench.EXAMPLE)(bench.bench)
app.command("perplexity", epilog=perplexity.EXAMPLE)(perplexity.perplexity)
app.command("info", epilog=info.EXAMPLE)(info.info)
app.command("list", epilog=list_.EXAMPLE)(list_.list_models)
app.command("verify", epilog=verify.EXAMPLE)(verify.verify)
app.command("plan", epilog=plan.EXAMPLE)(plan.plan)
app.command("trace", epilog=trace.EXAMPLE)(trace.trace)
app.command("profile", epilog=profile.EXAMPLE)(profile.profile)


def _print_version(value: bool) -> None:
    if value:
        from moe import __version__

        print(f"moe {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    debug: bool = typer.Option(False, "--debug", help="Show the traceback of an error (or set MOE_DEBUG=1)."),
    version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version, help="Print the version."),
) -> None:
    """Global options; `--debug` is read before the command runs (see moe.cli.errors)."""


def main(argv: list[str] | None = None) -> int:
    """The `moe` console script and `python -m moe`: run one command, return its exit code."""
    return execute(app, argv)
