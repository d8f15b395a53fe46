"""Writing a converted model's layout (see moe.runtime.layout): model.bin, experts.bin and the manifest."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .errors import MoeError
from .layout import (
    EXPERTS_FILE,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    MODEL_FILE,
    QUANT_BITS,
    Packed,
    Placement,
    crc32,
    tensor_nbytes,
)


class LayoutWriter:
    """Writes model.bin and experts.bin into `folder` where the layout's Placement puts each part, and collects
    the manifest's records."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.tensors: dict[str, dict] = {}
        self.experts: dict[str, list] = {}
        self.placement = Placement()
        self._files = {
            MODEL_FILE: open(self.folder / MODEL_FILE, "wb"),
            EXPERTS_FILE: open(self.folder / EXPERTS_FILE, "wb"),
        }

    def _pad_to(self, fname: str, offset: int) -> None:
        f = self._files[fname]
        f.write(b"\0" * (offset - f.tell()))

    def add(self, name: str, p: Packed) -> None:
        self.add_rows(name, p.encoding, p.shape, [p], p.group_size)

    def add_rows(self, name: str, encoding: str, shape: tuple[int, ...], blocks, group_size: int = 0) -> None:
        """Write one tensor given as consecutive blocks of whole rows (each a Packed), so a large tensor
        never has to be in memory at once: the codes go straight to the file, the scales (a sixteenth
        of the codes at most) are held until the codes are complete."""
        if name in self.tensors:
            raise MoeError(f"tensor {name} written twice; this is a bug in the converter", 1)
        place = self.placement.tensor(encoding, shape, group_size)
        fname = place.file
        entry = {"file": fname, "encoding": encoding, "shape": list(shape)}
        if encoding in QUANT_BITS:
            entry["group_size"] = group_size
        f = self._files[fname]
        self._pad_to(fname, place.offset)
        entry["offset"] = place.offset
        checksum, supers, scales = 0, [], []
        for p in blocks:
            codes = np.ascontiguousarray(p.codes)
            f.write(memoryview(codes).cast("B"))
            checksum = crc32(memoryview(codes).cast("B"), checksum)
            if p.scales is not None:
                supers.append(np.ascontiguousarray(p.supers, dtype=np.uint16))
                scales.append(np.ascontiguousarray(p.scales, dtype=np.int8))
        written, expected = f.tell() - place.offset, tensor_nbytes(encoding, shape, group_size)[0]
        if written != expected:
            raise MoeError(f"tensor {name}: {written} bytes of codes for {expected}; this is a bug in the converter", 1)
        entry["crc32"] = checksum
        if place.scales_offset is not None:
            region = np.concatenate([np.concatenate(supers).view(np.uint8).ravel(), np.concatenate(scales).view(np.uint8).ravel()])
            self._pad_to(fname, place.scales_offset)
            f.write(memoryview(region).cast("B"))
            entry["scales_offset"] = place.scales_offset
            entry["scales_crc32"] = crc32(region)
        self.tensors[name] = entry

    def begin_expert(self, layer: int, expert: int) -> None:
        self._pad_to(EXPERTS_FILE, self.placement.begin_run(layer, expert))

    def end_expert(self) -> None:
        layer, expert, start, nbytes = self.placement.end_run()
        f = self._files[EXPERTS_FILE]
        f.flush()
        with open(f.name, "rb") as r:
            r.seek(start)
            checksum = crc32(r.read(nbytes))
        runs = self.experts.setdefault(str(layer), [])
        if len(runs) != expert:
            raise MoeError(f"experts of layer {layer} written out of order; this is a bug in the converter", 1)
        runs.append({"offset": start, "nbytes": nbytes, "crc32": checksum})

    def finish(self, manifest: dict) -> dict:
        """Pad experts.bin to a whole page, close both files and write the manifest."""
        sizes = self.placement.file_sizes()
        files = {}
        for fname, f in self._files.items():
            self._pad_to(fname, sizes[fname])
            f.flush()
            os.fsync(f.fileno())
            files[fname] = {"size": f.tell()}
            f.close()
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            **manifest,
            "files": files,
            "tensors": self.tensors,
            "experts": self.experts,
        }
        with open(self.folder / MANIFEST, "w") as f:
            json.dump(manifest, f, separators=(",", ":"))  # compact: a tiny model's manifest is 5 % of it
        return manifest

    def abort(self) -> None:
        for f in self._files.values():
            f.close()
