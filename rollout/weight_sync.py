"""Weight sync from the learner into the rollout engines: one interface, pluggable transports.

A transport has a learner side (`publish`: write the full state dict somewhere and return a handle)
and an engine side (`receive`: load from the handle inside each vLLM worker). `file` is the CPU
transport; NCCL broadcast and CUDA IPC handles plug in here for GPU placements.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from rl.fileio import publish_file


class WeightLoader:
    """Mixed into every vLLM worker (`worker_extension_cls`): methods the engine calls by name
    through `collective_rpc`, so no function is pickled and vLLM's insecure serialization stays off."""

    def prunerl_load_safetensors(self, path: str) -> None:
        # reload_weights goes through the model's own weight loaders, which the CPU backend
        # needs (it repacks linear weights).
        from safetensors.torch import load_file

        self.reload_weights(weights_iterator=iter(load_file(path).items()))


class FileTransport:
    """Safetensors file on a filesystem both sides can read (one node, or a shared mount)."""

    name = "file"

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)

    def publish(self, state_dict: dict[str, torch.Tensor], version: int) -> str:
        from safetensors.torch import save_file

        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"weights-{version}.safetensors"
        with publish_file(path) as tmp:
            save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, str(tmp))
        for old in self.directory.glob("weights-*.safetensors"):
            if old != path:
                old.unlink(missing_ok=True)
        return str(path)

    @staticmethod
    def receive(llm, handle: str, timeout_s: float) -> None:
        llm.collective_rpc("prunerl_load_safetensors", timeout=timeout_s, args=(handle,))


TRANSPORTS = {"file": FileTransport}
