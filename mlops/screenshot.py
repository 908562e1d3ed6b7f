"""A PNG of a terminal pane: the ANSI text `tmux capture-pane -e -p` printed, drawn cell by cell with its colours
(rich parses the escapes, Pillow draws them in DejaVu Sans Mono). Used for the README's `mlops rollout watch`
picture, which a test captures from a real tmux pane rather than anyone drawing it."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont
from rich.color import Color
from rich.console import Console
from rich.terminal_theme import MONOKAI
from rich.text import Text

FONT = Path("/usr/share/fonts/truetype/dejavu/DejaVuSansMono.ttf")
BOLD = Path("/usr/share/fonts/truetype/dejavu/DejaVuSansMono-Bold.ttf")


def _rgb(color: Color | None, default: tuple[int, int, int]) -> tuple[int, int, int]:
    if color is None or color.is_default:
        return default
    triplet = color.get_truecolor(MONOKAI)
    return (triplet.red, triplet.green, triplet.blue)


def ansi_to_png(ansi: str, path: Path, size: int = 15) -> Path:
    lines = ansi.rstrip("\n").split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    regular = ImageFont.truetype(str(FONT), size) if FONT.exists() else ImageFont.load_default()
    bold = ImageFont.truetype(str(BOLD), size) if BOLD.exists() else regular
    cell_w = int(regular.getlength("M"))
    cell_h = int(size * 1.35)
    texts = [Text.from_ansi(line) for line in lines]
    console = Console(width=1000)
    width = max((len(t.plain) for t in texts), default=1)
    foreground = (MONOKAI.foreground_color.red, MONOKAI.foreground_color.green, MONOKAI.foreground_color.blue)
    background = (MONOKAI.background_color.red, MONOKAI.background_color.green, MONOKAI.background_color.blue)
    pad = 12
    image = Image.new("RGB", (width * cell_w + 2 * pad, len(texts) * cell_h + 2 * pad), background)
    draw = ImageDraw.Draw(image)
    for row, text in enumerate(texts):
        y = pad + row * cell_h
        for col, char in enumerate(text.plain):
            style = text.get_style_at_offset(console, col)
            x = pad + col * cell_w
            if style.bgcolor is not None and not style.bgcolor.is_default:
                draw.rectangle([x, y, x + cell_w, y + cell_h], fill=_rgb(style.bgcolor, background))
            if char != " ":
                font = bold if style.bold else regular
                draw.text((x, y), char, font=font, fill=_rgb(style.color, foreground))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
