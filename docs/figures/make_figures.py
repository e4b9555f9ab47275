"""Draw docs/figures/gate_values.png: per-token gate values of a trained eraser.

    python docs/figures/make_figures.py [--steps 800]

Trains a ``styles`` eraser for "Van Gogh" on the built-in semantic pipeline (a real pretrained
text encoder), then plots ``g(t)`` for the first tokens of prompts with the erased painter, two
other painters and an unrelated prompt.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from cpe_adapter import train_cpe
from cpe_adapter.gate import gate_values
from cpe_adapter.report import require
from cpe_adapter.testing import tiny_pipeline

PROMPTS = [
    "a painting by Van Gogh",
    "a painting by Claude Monet",
    "a painting by Rembrandt",
    "a photo of a red car",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--out", default=str(Path(__file__).with_name("gate_values.png")))
    args = parser.parse_args()

    pipe = tiny_pipeline("sd-semantic")
    adapter = train_cpe(pipe, "Van Gogh", preset="styles", steps=args.steps, stages=1, progress=False)
    tokenizer = pipe.tokenizer
    matplotlib = require("matplotlib", "Drawing figures")
    matplotlib.use("Agg")
    plt = require("matplotlib.pyplot", "Drawing figures")
    fig, axes = plt.subplots(len(PROMPTS), 1, figsize=(7, 1.6 * len(PROMPTS)), sharey=True)
    with torch.no_grad():
        for ax, prompt in zip(axes, PROMPTS, strict=True):
            embeds = pipe.encode_prompt(prompt, "cpu", 1, False)[0]
            gates, _ = gate_values(embeds, adapter.gate_a, adapter.key_weight(), adapter.gate_v)
            ids = tokenizer(prompt)["input_ids"]
            count = len(ids) + 1
            ax.bar(range(count), gates[0, 0, :count].numpy(), color="tab:red" if "Gogh" in prompt else "tab:blue")
            ax.set_xticks(range(count), [*tokenizer.convert_ids_to_tokens(ids), "[pad]"], fontsize=7)
            ax.set_ylim(0, 1)
            ax.set_ylabel("g(t)")
            ax.set_title(prompt, fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
