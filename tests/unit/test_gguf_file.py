"""engine.loader.gguf_file: the same metadata and tensors as gguf.GGUFReader, clear errors."""

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from engine.errors import UnsupportedModel  # noqa: E402
from engine.loader.gguf_file import GGUFFile  # noqa: E402


@pytest.fixture
def small_gguf(tmp_path):
    """A file with every metadata kind the loader meets and plain + block-quantized tensors."""
    path = tmp_path / "small.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint32("llama.block_count", 2)
    w.add_int32("test.negative", -7)
    w.add_uint64("test.big", 1 << 40)
    w.add_float32("llama.rope.freq_base", 500000.0)
    w.add_float64("test.f64", 0.125)
    w.add_bool("tokenizer.ggml.add_bos_token", True)
    w.add_string("tokenizer.chat_template", "{{ héllo }} ✓")
    w.add_array("tokenizer.ggml.tokens", ["<s>", "a", "ü", "", "  b"])
    w.add_array("tokenizer.ggml.token_type", [3, 1, 1, 1, 1])
    w.add_array("test.floats", [0.5, -1.5])
    w.add_custom_alignment(64)
    rng = np.random.default_rng(0)
    w.add_tensor("a.weight", rng.standard_normal((3, 32)).astype(np.float32))
    w.add_tensor("b.weight", rng.standard_normal((5, 16)).astype(np.float16))
    q = gguf.quants.quantize(rng.standard_normal((4, 64)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("c.weight", q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_reads_what_gguf_reader_reads(small_gguf):
    ours, theirs = GGUFFile(small_gguf), gguf.GGUFReader(str(small_gguf))
    expected = {k: f.contents() for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    assert ours.fields == expected
    assert ours.fields["tokenizer.ggml.tokens"] == ["<s>", "a", "ü", "", "  b"]
    assert ours.fields["test.negative"] == -7 and ours.fields["test.big"] == 1 << 40
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for a, b in zip(ours.tensors, theirs.tensors):
        assert tuple(a.shape) == tuple(int(d) for d in b.shape)
        assert a.tensor_type == int(b.tensor_type)
        assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape
        np.testing.assert_array_equal(a.data, b.data)
        deq = gguf.quants.dequantize(a.data, a.tensor_type)
        np.testing.assert_array_equal(deq, gguf.quants.dequantize(b.data, b.tensor_type))
    assert ours.tensors[0].offset % 64 == 0  # the custom alignment was honoured


def test_bad_files_raise_clear_errors(small_gguf, tmp_path):
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(UnsupportedModel, match="empty file"):
        GGUFFile(empty)
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"PK\x03\x04" + bytes(64))
    with pytest.raises(UnsupportedModel, match="not a GGUF file"):
        GGUFFile(not_gguf)
    data = small_gguf.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:200])  # inside the metadata
    with pytest.raises(UnsupportedModel, match="not a readable GGUF file"):
        GGUFFile(cut)
    short = tmp_path / "short.gguf"
    short.write_bytes(data[:-100])  # the last tensor's bytes are missing
    with pytest.raises(UnsupportedModel, match="past the end"):
        GGUFFile(short)
    v9 = tmp_path / "v9.gguf"
    v9.write_bytes(data[:4] + (9).to_bytes(4, "little") + data[8:])
    with pytest.raises(UnsupportedModel, match="version 9"):
        GGUFFile(v9)
