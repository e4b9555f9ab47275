"""Erase an artist's style, save the eraser, and compare images before and after.

python examples/erase_style.py --base stable-diffusion-v1-5/stable-diffusion-v1-5 --device cuda
python examples/erase_style.py            # offline, on the built-in tiny pipeline
"""

from __future__ import annotations

import argparse

import torch

import cpe_adapter
from cpe_adapter.cli import load_pipeline
from cpe_adapter.images import save_image_grid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="tiny:sd-semantic")
    parser.add_argument("--artist", default="Van Gogh")
    parser.add_argument("--steps", type=int, default=None, help="erase iterations (default: the full preset)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", default="outputs/erase-style")
    args = parser.parse_args()

    pipe = load_pipeline(args.base, args.device)
    adapter = cpe_adapter.train_cpe(pipe, args.artist, preset="styles", steps=args.steps, device=args.device)
    adapter.save_pretrained(args.out)
    pipe.load_cpe_adapter(args.out, adapter_name="style")

    prompt = f"a village at night, painting by {args.artist}"
    images = []
    for enabled in (False, True):
        (pipe.enable_cpe_adapters if enabled else pipe.disable_cpe_adapters)()
        generator = torch.Generator("cpu").manual_seed(0)
        images.append(pipe(prompt, generator=generator, num_inference_steps=30).images[0])
    path = save_image_grid(images, ["original", "erased"], f"{args.out}/compare.png", suptitle=prompt)
    print(f"saved the eraser to {args.out} and a comparison to {path}")


if __name__ == "__main__":
    main()
