"""ggml's tensor types as weight candidates: each is the gguf package's own quantizer (a tensor written to a GGUF file
by its writer and read back by its reader decodes to mpq's fake quant, and takes the bytes mpq prices); a Linear
weight whose rows are not whole blocks, and any convolution, stay FP as the runtimes keep them. A run with GGUF
candidates through every stage, and its export: tests/test_gguf_export.py."""

from __future__ import annotations

import pytest
import torch

from mpq.cost import CostModel
from mpq.errors import MpqError
from mpq.layers import LayerInfo
from mpq.quant.formats import resolve
from mpq.quant.formats.gguf import TYPES


def test_the_types_are_the_ones_gguf_writes_with_its_block_sizes():
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    for name, (elements, nbytes, _) in TYPES.items():
        assert GGML_QUANT_SIZES[GGMLQuantizationType[name.upper()]] == (elements, nbytes), name


@pytest.mark.parametrize("name", sorted(TYPES))
def test_a_tensor_in_a_gguf_file_decodes_to_the_fake_quant_and_takes_the_priced_bytes(name, tmp_path):
    import gguf
    from gguf import GGMLQuantizationType, quants

    fmt = resolve(f"gguf-{name}")
    w = torch.randn(48, 512, generator=torch.Generator().manual_seed(3)) * 0.05
    qtype = GGMLQuantizationType[name.upper()]
    path = tmp_path / "t.gguf"
    writer = gguf.GGUFWriter(str(path), "mpq-test")
    writer.add_tensor("w", quants.quantize(w.numpy(), qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tensor = gguf.GGUFReader(str(path)).tensors[0]
    decoded = torch.from_numpy(quants.dequantize(tensor.data, tensor.tensor_type).copy()).reshape(w.shape)
    fq = fmt.fake_quant(w, {}, (0, 512))
    assert torch.equal(fq, decoded) and not torch.equal(fq, w)
    assert tensor.tensor_type == qtype and fmt.stored_bytes(tuple(w.shape), (0, 512)) == tensor.n_bytes


def test_what_the_runtimes_keep_fp_stays_fp_and_is_priced_fp():
    cost = CostModel(2, 2)
    for shape, kind in (((48, 100), "linear"), ((16, 32, 3, 3), "conv")):  # 100: not whole blocks; a conv weight
        fmt = resolve("gguf-q4_0")
        w = torch.randn(shape)
        info = LayerInfo("model.x", kind, shape, (0, shape[1]), False, 1)
        assert not fmt.stores(shape) and torch.equal(fmt.fake_quant(w, {}, (0, shape[1])), w)
        assert cost.weight_bytes(info, "gguf-q4_0") == cost.weight_bytes(info, None) == w.numel() * 2
    for bad, needle in (("gguf-q4_k", "does not write ggml type 'q4_k'"), ("gguf-f16", "is floating point")):
        with pytest.raises(MpqError, match=needle) as err:
            resolve(bad)
        assert "\n" not in str(err.value)
