"""Small image helpers: side-by-side grids with captions (PIL only, no plotting library)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

CAPTION_HEIGHT = 16


def image_grid(
    images: Sequence[Image.Image], titles: Sequence[str] | None = None, columns: int | None = None
) -> Image.Image:
    """Paste ``images`` (same size) into a grid, each with its caption above it."""
    if not images:
        raise ValueError("image_grid needs at least one image.")
    columns = columns or len(images)
    rows = -(-len(images) // columns)
    width, height = images[0].size
    cell = height + (CAPTION_HEIGHT if titles else 0)
    grid = Image.new("RGB", (columns * width, rows * cell), "white")
    draw = ImageDraw.Draw(grid)
    for index, image in enumerate(images):
        x, y = (index % columns) * width, (index // columns) * cell
        if titles:
            draw.text((x + 2, y + 2), str(titles[index])[: max(4, width // 6)], fill="black")
            y += CAPTION_HEIGHT
        grid.paste(image.convert("RGB").resize((width, height)), (x, y))
    return grid


def save_image_grid(
    images: Sequence[Image.Image], titles: Sequence[str], path: str | Path, suptitle: str | None = None
) -> Path:
    """Save a captioned grid as PNG (``suptitle`` goes into the PNG's text metadata)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    if suptitle:
        info.add_text("Title", suptitle)
    path = Path(path)
    image_grid(images, titles).save(path, pnginfo=info)
    return path
