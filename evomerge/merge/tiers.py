"""The storage behind each tier: packed block buffers (device, host) and mapped safetensors (disk).

A `BlockStore` holds the blocks of one source (the base, or one expert's task
vector) that the plan put in one tier, packed into one flat tensor (pinned
when it is host memory feeding a CUDA device). The disk tier reads tensors
straight from the checkpoint files through `SafetensorsMap`: the file is
memory-mapped, a tensor is a zero-copy view, and after it is copied into
staging its pages are dropped from the process (`madvise(DONTNEED)`), so
streaming a 40 GB expert does not grow the process's resident memory.
"""

from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path

import torch

from evomerge.errors import EvomergeError
from evomerge.merge.loading import _DTYPES

_PAGE = mmap.PAGESIZE


class BlockStore:
    """Blocks of one source kept in one tier, packed into one flat tensor."""

    def __init__(self, blocks: list, dtype: torch.dtype, device, pinned: bool = False):
        self.offsets = {}
        total = 0
        for block in blocks:
            self.offsets[block.index] = total
            total += block.numel
        self.numel = total
        kwargs = {"pin_memory": True} if pinned else {}
        self.data = torch.empty(total, dtype=dtype, device=device, **kwargs)

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def view(self, block) -> torch.Tensor:
        start = self.offsets[block.index]
        return self.data[start : start + block.numel]

    def slot_view(self, block, slot) -> torch.Tensor:
        start = self.offsets[block.index] + slot.offset - block.start
        return self.data[start : start + slot.numel]


class SafetensorsMap:
    """One safetensors file, memory-mapped: tensors as flat CPU views without copying."""

    def __init__(self, file: Path, model_path):
        self.file = Path(file)
        if self.file.suffix != ".safetensors":
            raise EvomergeError(
                f"model {model_path}: the disk tier reads safetensors files, but {self.file.name} is not one; "
                "convert the checkpoint with save_pretrained(..., safe_serialization=True) or give more memory"
            )
        try:
            with open(self.file, "rb") as handle:
                (header_len,) = struct.unpack("<Q", handle.read(8))
                header = json.loads(handle.read(header_len))
                self._mmap = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
        except (OSError, ValueError, struct.error) as err:
            raise EvomergeError(
                f"model {model_path}: cannot memory-map {self.file.name} for the disk tier ({err})"
            ) from err
        header.pop("__metadata__", None)
        self.data_start = 8 + header_len
        self.entries = header

    def view(self, name: str) -> torch.Tensor:
        entry = self.entries[name]
        dtype = _DTYPES.get(entry["dtype"].upper())
        if dtype is None:
            raise EvomergeError(f"{self.file}: tensor {name} has dtype {entry['dtype']}, which evomerge cannot map")
        begin, end = entry["data_offsets"]
        count = (end - begin) // torch.empty((), dtype=dtype).element_size()
        if count == 0:
            return torch.empty(0, dtype=dtype)
        return torch.frombuffer(self._mmap, dtype=dtype, count=count, offset=self.data_start + begin)

    def release(self, name: str) -> None:
        """Drop the tensor's pages from this process (the page cache may keep them)."""
        begin, end = self.entries[name]["data_offsets"]
        start = (self.data_start + begin) // _PAGE * _PAGE
        length = self.data_start + end - start
        if length > 0 and hasattr(self._mmap, "madvise"):
            self._mmap.madvise(mmap.MADV_DONTNEED, start, length)


class DiskSource:
    """Every tensor of one model, memory-mapped from its safetensors files."""

    def __init__(self, model_files):
        self.path = model_files.path
        self._maps = {}
        self._file_of = dict(model_files.tensor_files)
        for file in sorted(set(self._file_of.values())):
            self._maps[file] = SafetensorsMap(file, model_files.path)

    def view(self, name: str) -> torch.Tensor:
        return self._maps[self._file_of[name]].view(name)

    def release(self, name: str) -> None:
        self._maps[self._file_of[name]].release(name)

    def read_block(self, block, dest: torch.Tensor) -> None:
        """Copy the block's tensors (converted to dest's dtype) into `dest` ([block.numel], CPU or same device)."""
        for slot in block.slots:
            dest[slot.offset - block.start : slot.end - block.start].copy_(self.view(slot.name))
            self.release(slot.name)
