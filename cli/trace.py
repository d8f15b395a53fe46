"""`moe trace MODEL PROMPT`: which experts each prompt token chose in each MoE layer, and their weights."""

from __future__ import annotations

import colorsys
import io
from pathlib import Path
from typing import Annotated

import typer
from moe.runtime.errors import MoeError
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .common import open_model, out, print_json, text_argument
from .options import Json, ModelArg, Threads

EXAMPLE = """Examples:

\b
  moe trace MODEL "def fibonacci(n):"
  moe trace MODEL "def fibonacci(n):" --json > trace.json
  moe trace MODEL "for i in range(10):" --svg trace.svg
"""


def trace(
    model: ModelArg,
    prompt: Annotated[str, typer.Argument(metavar="PROMPT", show_default=False,
                                          help="The text to run (tokenized as is, no BOS added).")],
    svg: Annotated[Path | None, typer.Option(metavar="FILE", show_default=False,
                                             help="Also save the table as an SVG picture.")] = None,
    threads: Threads = None,
    json: Json = False,
) -> None:
    """Run the prompt and show, per token and MoE layer, the experts the router chose and their weights."""
    from moe.runtime.routing_stats import trace as run_trace

    prompt = text_argument(prompt, "PROMPT")
    loaded, _ = open_model(model, threads=threads)
    ids = loaded.tokenizer.encode(prompt, add_bos=False)
    if not ids:
        raise MoeError("PROMPT holds no token; give some text")
    result = run_trace(loaded, ids)
    if json:
        print_json(result)
    else:
        out.print(table(result, loaded.config.num_experts))
    if svg is not None:
        recorder = Console(record=True, width=max(80, 14 + 12 * len(result["tokens"][0]["layers"])), file=io.StringIO())
        recorder.print(table(result, loaded.config.num_experts))
        try:
            recorder.save_svg(str(svg), title=f"moe trace: {prompt[:60]}")
        except OSError as exc:
            raise MoeError(f"--svg {svg}: cannot write it ({exc.strerror})") from None


def table(result: dict, num_experts: int) -> Table:
    """Tokens as rows, MoE layers as columns; each expert in its own colour, with its weight."""
    layers = [entry["layer"] for entry in result["tokens"][0]["layers"]]
    t = Table(title="experts chosen (weight)", title_justify="left")
    t.add_column("token", no_wrap=True)
    for layer in layers:
        t.add_column(f"layer {layer}", no_wrap=True)
    for token in result["tokens"]:
        cells = []
        for entry in token["layers"]:
            cell = Text()
            for expert, weight in zip(entry["experts"], entry["weights"], strict=True):
                cell.append(f"{expert:>{len(str(num_experts - 1))}}", style=f"bold {colour(expert)}")
                cell.append(f" {weight:.2f} ", style="dim")
            cells.append(cell)
        t.add_row(Text(repr(token["text"])[1:-1]), *cells)
    return t


def colour(expert: int) -> str:
    """A colour of its own per expert: hues spread around the wheel, neighbours far apart."""
    hue = (expert * 0.381966) % 1.0  # golden-ratio steps: consecutive ids get distant hues
    r, g, b = colorsys.hsv_to_rgb(hue, 0.7, 1.0)
    return f"rgb({int(r * 255)},{int(g * 255)},{int(b * 255)})"

