"""int4 splits mean the same on every CPU: a split stores the portable "rows" layout
whichever machine made it, a machine makes the layout its own products read when it
loads, and a split made before (in the making machine's torch layout, named in its
manifest) loads to the very same weights and logits."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.test_quant import PROMPT, _load
from tpi.quant import quantize
from tpi.quant.int4_pack import ROWS, Int4Layout, unpack
from tpi.quant.quantize import QuantError, QuantSpec
from tpi.storage.manifest import read_manifest
from tpi.storage.split import split_model

OLD = Int4Layout(64, True)  # what an AVX-512 machine stored before "rows"


def _stored_int4(split_dir) -> dict[str, torch.Tensor]:
    """The packed int4 tensors of layer 0 as the file holds them."""
    rank = split_dir / "rank0"
    name = next(n for n in read_manifest(rank)[0].files if n.startswith("layer_"))
    return {k: v for k, v in load_file(rank / name).items() if k.endswith(".q4")}


@pytest.fixture(scope="module")
def splits(llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("int4-portable")
    new = split_model(llama_dir, root / "new", [1.0], quant=QuantSpec.for_split("int4"))
    with pytest.MonkeyPatch.context() as mp:  # a split as tpi made them before "rows"
        mp.setattr(quantize, "disk_layout", lambda: OLD)
        old = split_model(llama_dir, root / "old", [1.0], quant=QuantSpec.for_split("int4"))
    return new, old


def test_a_split_stores_rows_and_an_old_one_names_its_layout(splits):
    new, old = splits
    assert read_manifest(new / "rank0")[0].quant.int4_layout == "rows"
    assert read_manifest(old / "rank0")[0].quant.int4_layout == OLD.name
    stored_new, stored_old = _stored_int4(new), _stored_int4(old)
    assert stored_new and stored_new.keys() == stored_old.keys()
    for name, packed in stored_new.items():
        # The same 4-bit integers, in two layouts: rows of nibbles, and torch's blocks.
        nibbles = unpack(packed, ROWS)
        assert torch.equal(nibbles, unpack(stored_old[name], OLD))
        assert torch.equal(
            packed[:, :1] & 0x0F, nibbles[:, :1]
        )  # k = 0 in row n's first low nibble


def test_both_load_to_the_same_weights_and_logits(splits):
    """Each repacked at load into the layout this machine holds (tpi.quant.int4_pack):
    the same integers, so the same logits, bit for bit."""
    logits = []
    for split in splits:
        engine, runtime = _load(split)
        logits.append(engine.forward(PROMPT, 0, all_logits=True))
        runtime.close()
    assert torch.equal(logits[0], logits[1])


def test_an_unknown_layout_is_refused_in_one_line():
    with pytest.raises(QuantError, match="unknown int4 weight layout 'b7x'"):
        QuantSpec.from_dict({"mode": "int4", "int4_layout": "b7x"})
    assert QuantSpec.from_dict({"mode": "int4", "int4_layout": "rows"}).packing == ROWS


def test_slices_are_timed_with_int4_weights_as_a_shard_loads_them():
    """The planner's probe holds int4 weights in the layout the runtime holds (not
    the split's), so the kernels it times read what they will read."""
    from tpi.planning.slice_probe import Setting, _held
    from tpi.quant.int4_pack import held_layout
    from tpi.quant.quantize import quantize_int4

    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(3))
    held = _held({"gate_up": w}, Setting(quant="int4"))
    q, _ = quantize_int4(w, 32)
    assert torch.equal(unpack(held["gate_up.q4"], held_layout()), q)


@pytest.mark.parametrize("shape", [(112, 96), (208, 34), (64, 2), (48, 4096)])
def test_the_native_repack_makes_torchs_layouts_exactly(shape):
    """tpi_int4_pack_blocks (a split's "rows" into torch's blocks, at load): every
    block size and pairing, full and partial blocks, widths not a multiple of 16."""
    from tpi.kernels import int4_matmul
    from tpi.quant.int4_pack import CANDIDATES, pack

    q = torch.randint(0, 16, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    for layout in CANDIDATES:
        got = int4_matmul.pack_blocks(pack(q, ROWS), layout.block_n, layout.half_pairs)
        if got is None:
            pytest.skip("no C compiler here")
        assert torch.equal(got, pack(q, layout)), layout
