"""An all-F32 copy of a GGUF: the same file with every tensor dequantized, for llama.cpp on exact weights.

llama.cpp on the Q4_K_M file multiplies quantized weights by quantized activations; on this copy it
multiplies float32 weights that hold exactly the dequantized Q4_K_M values (what the reference runs),
so the difference between the two llama.cpp runs is the quantized arithmetic, and the difference
between this copy and the reference is llama.cpp's implementation.

The copy keeps GGUF's own layout: the same tensor names, shapes and order (no HF renaming; the Gemma
norms stay stored as ``1 + w``), every key/value field byte for byte (types included: the tokenizer
arrays, ``general.quantization_version``, ...), except ``general.file_type``, which becomes ALL_F32.
``GGUF.*`` (header pseudo-fields) and ``general.architecture`` are written by ``GGUFWriter`` itself.

Public API: :func:`write_f32_gguf`, :func:`f32_path`, :func:`matches` (the cache check), :func:`verify`
(the read-back check through the reference's own loader), :func:`read_header`.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

F32_FILE_NAME = "gemma-3-270m-F32.gguf"
ALL_F32 = 0  # llama.cpp's LLAMA_FTYPE_ALL_F32 (gguf.LlamaFileType.ALL_F32)
F32_TYPE = 0  # GGML_TYPE_F32
_SKIP = ("general.architecture",)  # GGUFWriter writes it from its `arch` argument
FILE_TYPE_KEY = "general.file_type"

# GGUF value types: fixed sizes of the scalar ones; 8 = STRING, 9 = ARRAY
_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9


class F32GGUFError(RuntimeError):
    """The F32 copy could not be written or does not hold what the source holds."""


@dataclass
class Header:
    """What :func:`read_header` reads without the tensor data: the key/value fields as raw bytes (for a
    byte-for-byte comparison) and the tensor table."""

    version: int
    fields: dict[str, tuple[int, bytes]]  # key -> (GGUF value type, the value's bytes as stored)
    tensors: list[tuple[str, tuple[int, ...], int, int]]  # name, GGUF dims (fastest first), ggml type, offset
    data_start: int
    size: int

    def scalar(self, key: str) -> int | None:
        vtype, raw = self.fields.get(key, (None, b""))
        fmt = {4: "<I", 5: "<i", 10: "<Q", 11: "<q"}.get(vtype)
        return struct.unpack(fmt, raw)[0] if fmt else None


def read_header(path: str | os.PathLike) -> Header:
    """The fields and tensor table of a GGUF, in about a second (``gguf.GGUFReader`` takes ~15 s on the
    270M file, most of it building views of the 262,144 tokenizer strings)."""
    with open(path, "rb") as f:
        buf = f.read(64 << 20)  # the 270M header is ~6 MB
        size = os.fstat(f.fileno()).st_size
    if buf[:4] != b"GGUF":
        raise F32GGUFError(f"{path} is not a GGUF file (magic {buf[:4]!r})")
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
    pos = 24

    def string(at: int) -> tuple[bytes, int]:
        (n,) = struct.unpack_from("<Q", buf, at)
        return buf[at + 8:at + 8 + n], at + 8 + n

    def skip(vtype: int, at: int) -> int:
        if vtype in _SIZES:
            return at + _SIZES[vtype]
        if vtype == _STRING:
            return string(at)[1]
        if vtype == _ARRAY:
            sub, count = struct.unpack_from("<IQ", buf, at)
            at += 12
            if sub in _SIZES:
                return at + count * _SIZES[sub]
            for _ in range(count):
                at = skip(sub, at)
            return at
        raise F32GGUFError(f"{path}: unknown GGUF value type {vtype}")

    fields: dict[str, tuple[int, bytes]] = {}
    for _ in range(n_kv):
        key, pos = string(pos)
        (vtype,) = struct.unpack_from("<I", buf, pos)
        end = skip(vtype, pos + 4)
        fields[key.decode()] = (vtype, buf[pos + 4:end])
        pos = end
    tensors = []
    for _ in range(n_tensors):
        name, pos = string(pos)
        (n_dims,) = struct.unpack_from("<I", buf, pos)
        dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
        ttype, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
        tensors.append((name.decode(), tuple(dims), ttype, offset))
        pos += 4 + 8 * n_dims + 12
    if pos > len(buf):
        raise F32GGUFError(f"{path}: header larger than expected ({pos} bytes)")
    align = struct.unpack("<I", fields["general.alignment"][1])[0] if "general.alignment" in fields else 32
    return Header(version, fields, tensors, -(-pos // align) * align, size)


def _elements(dims: tuple[int, ...]) -> int:
    n = 1
    for d in dims:
        n *= d
    return n


def matches(src: str | os.PathLike, dst: str | os.PathLike) -> str | None:
    """``None`` if ``dst`` is the F32 copy of ``src`` (same fields byte for byte but ``general.file_type``,
    same tensors in the same order and shapes, all F32, the data all there); else why not, in one line."""
    if not Path(dst).is_file():
        return f"{dst} does not exist"
    a, b = read_header(src), read_header(dst)
    if len(a.tensors) != len(b.tensors):
        return f"{len(b.tensors)} tensors, the source has {len(a.tensors)}"
    for (name, dims, _, _), (name2, dims2, ttype2, _) in zip(a.tensors, b.tensors, strict=True):
        if (name, dims) != (name2, dims2) or ttype2 != F32_TYPE:
            return f"tensor {name2} {list(dims2)} type {ttype2}, the source has {name} {list(dims)} (want F32)"
    want = {k: v for k, v in a.fields.items() if k != FILE_TYPE_KEY}
    have = {k: v for k, v in b.fields.items() if k != FILE_TYPE_KEY}
    if want != have:
        diff = sorted(set(want) ^ set(have)) or sorted(k for k in want if want[k] != have[k])
        return f"metadata differs from the source's: {', '.join(diff[:5])}"
    if b.scalar(FILE_TYPE_KEY) != ALL_F32:
        return f"general.file_type is {b.scalar(FILE_TYPE_KEY)}, not ALL_F32 ({ALL_F32})"
    name, dims, _, offset = b.tensors[-1]
    if b.size < b.data_start + offset + 4 * _elements(dims):
        return f"truncated: {b.size} bytes, the tensor data ends at {b.data_start + offset + 4 * _elements(dims)}"
    return None


def write_f32_gguf(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Write the all-F32 copy of ``src`` to ``dst`` (atomically: a temporary name, then a rename)."""
    import numpy as np
    from gguf import GGUFReader, GGUFValueType, GGUFWriter
    from gguf.quants import dequantize

    src, dst = Path(src), Path(dst)
    reader = GGUFReader(str(src))
    arch_field = reader.fields.get("general.architecture")
    if arch_field is None:
        raise F32GGUFError(f"{src} has no general.architecture")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    writer = GGUFWriter(str(tmp), arch_field.contents())
    try:
        for key, field in reader.fields.items():
            if key.startswith("GGUF.") or key in _SKIP:
                continue
            vtype = GGUFValueType(field.types[0])
            sub_type = None
            if vtype == GGUFValueType.ARRAY:
                if len(field.types) != 2:
                    raise F32GGUFError(f"{src}: field {key} is a nested array, which this copy does not handle")
                sub_type = GGUFValueType(field.types[1])
            value = ALL_F32 if key == FILE_TYPE_KEY else field.contents()
            writer.add_key_value(key, value, vtype, sub_type=sub_type)
            if key == "general.alignment":
                writer.data_alignment = int(value)
        for t in reader.tensors:
            numpy_shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims fastest first
            writer.add_tensor_info(t.name, numpy_shape, np.dtype(np.float32), 4 * int(t.n_elements))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in reader.tensors:  # one tensor in memory at a time
            arr = np.ascontiguousarray(np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32))
            if arr.size != int(t.n_elements):
                raise F32GGUFError(f"{src}: {t.name} dequantized to {arr.size} values, expected {t.n_elements}")
            writer.write_tensor_data(arr.reshape(-1))
        writer.close()
        why = matches(src, tmp)
        if why:
            raise F32GGUFError(f"the F32 copy of {src.name} is wrong: {why}")
        os.replace(tmp, dst)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
    return dst


def f32_path(cache_dir: str | os.PathLike | None = None, src: str | os.PathLike | None = None) -> Path:
    """The all-F32 copy of the Gemma 3 270M Q4_K_M GGUF, next to it; written once (~1 GB, ~40 s) and reused
    while :func:`matches` holds. ``src`` defaults to ``fetch_gemma3_270m(cache_dir)``."""
    from reference_impl.gguf_loader import fetch_gemma3_270m

    src = Path(src) if src is not None else fetch_gemma3_270m(cache_dir)
    dst = src.with_name(F32_FILE_NAME)
    if dst.is_file() and matches(src, dst) is None:
        return dst
    return write_f32_gguf(src, dst)


def verify(src: str | os.PathLike, dst: str | os.PathLike, loaded=None) -> dict:
    """Read both files with the reference's own loader (``reference_impl.gguf_loader.read_gguf``): the same
    config, and state dicts equal bit for bit (the F32 file holds exactly the dequantized values).
    ``loaded``: ``read_gguf(src)``'s result if the caller has it. Returns a summary; raises on a mismatch."""
    import torch

    from reference_impl.gguf_loader import read_gguf

    cfg_q, state_q, meta_q = loaded or read_gguf(src)
    cfg_f, state_f, meta_f = read_gguf(dst)
    if cfg_q != cfg_f:
        raise F32GGUFError(f"{dst} reads to another config: {sorted(k for k in cfg_q if cfg_q[k] != cfg_f.get(k))}")
    if set(state_q) != set(state_f):
        raise F32GGUFError(f"{dst} holds other tensors: {sorted(set(state_q) ^ set(state_f))[:5]}")
    for name, value in state_q.items():
        other = state_f[name]
        if value.shape != other.shape or value.dtype != other.dtype or not torch.equal(
                value.view(torch.int32), other.view(torch.int32)):
            raise F32GGUFError(f"{dst}: {name} differs from the dequantized {Path(src).name}")
    types = set(meta_f["tensor_types"].values())
    if types != {"F32"}:
        raise F32GGUFError(f"{dst} holds tensor types {sorted(types)}, not only F32")
    return {"tensors": len(state_f), "values": sum(v.numel() for v in state_f.values()), "bit_equal": True,
            "file_type": meta_f["file_type"], "source_file_type": meta_q["file_type"],
            "source_types": sorted(set(meta_q["tensor_types"].values()))}
