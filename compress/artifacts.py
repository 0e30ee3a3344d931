"""Model folders written by compression stages."""
from __future__ import annotations

import shutil
from pathlib import Path

# Files of an input model folder that a stage's own save replaces, or that must not be carried over.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5", ".index.json")


def copy_tokenizer_files(source: Path, out_dir: Path) -> None:
    """Copy the files of `source` that the model's save did not write (tokenizer, chat template),
    leaving weights out."""
    for path in Path(source).iterdir():
        if path.is_file() and not path.name.endswith(WEIGHT_SUFFIXES) and not (Path(out_dir) / path.name).exists():
            shutil.copy2(path, Path(out_dir) / path.name)
