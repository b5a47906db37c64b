"""Write F32, F16 and Q8_0 copies of a registered model's GGUF (same metadata).

llama.cpp then runs the same weights at the precisions hetcomp compiles for. F32 and F16
hold the dequantized tensors; Q8_0 keeps the file's Q8_0 embedding byte for byte and
converts its Q4_1 matrices with ``gguf.quants`` (dequantize, then quantize), which is what
``hetcomp compile --dtype q8_0`` does, so both decoders run the same q8_0 blocks. Usage:
``python benchmarks/make_peer_ggufs.py OUT_DIR [--model smollm2] [--dtypes f32 f16 q8_0]``
-> OUT_DIR/{model}-{dtype}.gguf (an existing copy is kept).
"""

from __future__ import annotations

import argparse
import os
import sys

import gguf
import numpy as np

from hetcomp.frontend import MODELS, resolve_model


def convert(src: str, dst: str, dtype: str) -> None:
    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(dst, arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), vtype, sub)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype])
    q8 = gguf.GGMLQuantizationType.Q8_0
    for t in reader.tensors:
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))
        if dtype == "q8_0" and len(shape) == 2:
            data = (np.asarray(t.data) if t.tensor_type == q8 else gguf.quants.quantize(
                gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape), q8))
            writer.add_tensor(t.name, np.ascontiguousarray(data), raw_dtype=q8)  # bytes
            continue
        arr = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
        if dtype == "f16" and arr.ndim == 2:
            arr = arr.astype(np.float16)
        writer.add_tensor(t.name, np.ascontiguousarray(arr.astype(arr.dtype)))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", default="build/peers")
    ap.add_argument("--model", default="smollm2", choices=sorted(MODELS))
    ap.add_argument("--dtypes", nargs="+", default=["f32", "f16", "q8_0"],
                    choices=["f32", "f16", "q8_0"])
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for dtype in args.dtypes:
        dst = os.path.join(args.out, f"{args.model}-{dtype}.gguf")
        if not os.path.exists(dst):
            convert(resolve_model(args.model), dst + ".tmp", dtype)
            os.replace(dst + ".tmp", dst)
        print(dst)
    return 0


if __name__ == "__main__":
    sys.exit(main())
