"""`cpe_adapter.distributed.train_many`: a real two-process `accelerate launch` run on the CPU gives the
very same adapter, bit for bit, as one process (and as `train_cpe`).

Run as a script (`accelerate launch ... tests/test_distributed.py OUT`), this file is the worker.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

CONCEPTS = ["Van Gogh", "Monet", "Picasso"]
OPTIONS = {
    "preset": "styles",
    "steps": 12,
    "seed": 11,
    "stages": 2,
    "templates": ["{}", "a painting by {}", "art by {}"],
    "anchors": ["a dog", "a house", "Rembrandt"],
    "anchor_weight": 10.0,
    "first_stage_lr": 1e-2,
    "progress": False,
}


def _train(out: str | None = None):
    import torch

    from cpe_adapter.distributed import process_layout, train_many
    from cpe_adapter.testing import tiny_pipeline

    torch.set_num_threads(1)
    pipe = tiny_pipeline("sd")
    adapter = train_many(pipe, CONCEPTS, **OPTIONS)
    rank, world = process_layout()
    if out is not None and rank == 0:
        from safetensors.torch import save_file

        save_file(adapter.file_state_dict(), out, metadata={"world": str(world)})
    return adapter


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_give_the_single_process_adapter(tmp_path: Path):
    import torch
    from safetensors import safe_open

    from cpe_adapter.testing import tiny_pipeline
    from cpe_adapter.training import train_cpe

    out = tmp_path / "two.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        "2",
        "--multi_gpu",  # with no GPU, accelerate starts CPU processes joined by gloo
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        __file__,
        str(out),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    with safe_open(str(out), framework="pt") as handle:
        assert handle.metadata()["world"] == "2"
        two = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118

    previous = torch.get_num_threads()
    try:
        one = _train().file_state_dict()
        direct = train_cpe(tiny_pipeline("sd"), CONCEPTS, **OPTIONS).file_state_dict()
    finally:
        torch.set_num_threads(previous)
    assert sorted(two) == sorted(one) == sorted(direct)
    assert two["gate.A"].shape[0] == len(CONCEPTS)
    for key in one:
        assert torch.equal(two[key], one[key]), key
        assert torch.equal(direct[key], one[key]), key
    # The concepts really differ, so a mix-up of the order would have been caught.
    assert not torch.equal(one["gate.v"][0], one["gate.v"][1])


def test_a_result_sent_between_processes_keeps_every_field():
    import torch

    from cpe_adapter.config import ConceptSpec
    from cpe_adapter.distributed import _pack, _unpack
    from cpe_adapter.training import ConceptResult

    tensors = {"gate_a": torch.arange(6.0).view(1, 2, 3)}
    sent = ConceptResult(ConceptSpec("Van Gogh", "a photo", 0.5), 7, tensors, [{"stage": 0}], {"erase": 0.1}, ["Gogh"])
    index, received = _unpack(_pack(3, sent))
    assert index == 3
    assert (received.spec, received.seed, received.history) == (sent.spec, sent.seed, sent.history)
    assert (received.final_loss, received.variants) == (sent.final_loss, sent.variants)
    assert torch.equal(received.tensors["gate_a"], tensors["gate_a"])


if __name__ == "__main__":
    import torch.distributed

    _train(sys.argv[1])
    # Gloo's threads torn down at interpreter exit instead can abort the process (SIGABRT).
    torch.distributed.destroy_process_group()
