"""Erase 50 public figures with one adapter (concepts stacked on the concept axis).

python examples/erase_many_names.py --base stable-diffusion-v1-5/stable-diffusion-v1-5 --device cuda
python examples/erase_many_names.py --count 3 --steps 200      # quick, offline, tiny pipeline
accelerate launch --num_processes 2 --cpu examples/erase_many_names.py --count 4 --steps 200

Under ``accelerate launch`` the concepts are shared out over the processes
(``cpe_adapter.distributed.train_many``); every process gets the merged adapter, the main one saves it.
"""

from __future__ import annotations

import argparse

import torch

from cpe_adapter.cli import load_pipeline
from cpe_adapter.distributed import process_layout, train_many
from cpe_adapter.pools import concept_pool


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="tiny:sd-semantic")
    parser.add_argument("--count", type=int, default=50)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", default="outputs/erase-names")
    args = parser.parse_args()

    pipe = load_pipeline(args.base, args.device)
    names = concept_pool("names")[: args.count]
    adapter = train_many(pipe, names, preset="names", steps=args.steps, device=args.device)
    if process_layout()[0] == 0:
        adapter.save_pretrained(args.out)
        print(f"{adapter.num_concepts} names erased by one adapter, saved to {args.out}")
    if torch.distributed.is_initialized():  # leave no gloo threads for interpreter exit to tear down
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
