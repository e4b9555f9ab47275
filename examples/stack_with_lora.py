"""Use a style eraser together with a diffusers LoRA on the same pipeline.

The eraser wraps the cross-attention key/value projections as plain linear layers, so a LoRA loaded
before or after it wraps them in turn; fusing, unfusing or unloading the LoRA leaves the erasure as
it was.

    python examples/stack_with_lora.py --base stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --eraser org/erase-vangogh --lora some-org/some-style-lora --device cuda
"""

from __future__ import annotations

import argparse

import torch

from cpe_adapter.cli import load_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True)
    parser.add_argument("--eraser", required=True, help="CPE adapter folder or Hub id")
    parser.add_argument("--lora", required=True, help="LoRA folder or Hub id (diffusers format)")
    parser.add_argument("--prompt", default="a painting of sunflowers by Van Gogh")
    parser.add_argument("--device", default=None)
    args = parser.parse_args()

    pipe = load_pipeline(args.base, args.device)
    pipe.load_cpe_adapter(args.eraser, adapter_name="eraser")
    pipe.load_lora_weights(args.lora, adapter_name="style")
    pipe.set_adapters(["style"], adapter_weights=[0.8])
    generator = torch.Generator("cpu").manual_seed(0)
    pipe(args.prompt, generator=generator).images[0].save("lora_and_eraser.png")

    pipe.fuse_lora()
    generator = torch.Generator("cpu").manual_seed(0)
    pipe(args.prompt, generator=generator).images[0].save("fused_lora_and_eraser.png")
    pipe.unfuse_lora()
    pipe.unload_lora_weights()
    print("active erasers after the LoRA was removed:", pipe.get_active_cpe_adapters())


if __name__ == "__main__":
    main()
