"""The streaming safetensors writer (builder/tensorfile.py): same bytes as safetensors itself, any
tensor order; and how outputs split into shards (builder/artifact/shards.py)."""

import random

import pytest
import torch
from safetensors.torch import load_file, save_file

from builder import tensorfile
from builder.artifact import shards
from builder.tensorfile import Output

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn, torch.int8, torch.int32,
          torch.int64, torch.uint8, torch.bool]


def random_tensors(seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    chooser = random.Random(seed)
    found = {}
    for index in range(chooser.randint(1, 12)):
        shape = tuple(chooser.randint(1, 7) for _ in range(chooser.randint(0, 3)))
        dtype = chooser.choice(DTYPES)
        values = torch.randn(shape, generator=generator) * 50
        found[f"t{chooser.randint(0, 99)}.{index}"] = values.to(dtype)
    return found


@pytest.mark.parametrize("seed", range(8))
def test_streamed_shard_equals_safetensors_save_file_bytes(tmp_path, seed):
    tensors = random_tensors(seed)
    save_file(tensors, tmp_path / "reference.safetensors", metadata={"format": "pt"})
    names = list(tensors)
    random.Random(seed).shuffle(names)  # arrival order must not matter
    outputs = [Output(n, tensors[n].dtype, tuple(tensors[n].shape)) for n in names]
    tensorfile.write(tmp_path / "streamed.safetensors", outputs, lambda name: tensors[name])
    assert (tmp_path / "streamed.safetensors").read_bytes() == (tmp_path / "reference.safetensors").read_bytes()
    loaded = load_file(tmp_path / "streamed.safetensors")
    assert all(torch.equal(loaded[n].view(torch.uint8), tensors[n].view(torch.uint8)) for n in tensors
               if tensors[n].dim())


def test_a_produced_tensor_that_differs_from_the_plan_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="planned"):
        tensorfile.write(tmp_path / "x.safetensors", [Output("a", torch.float32, (2,))],
                     lambda name: torch.zeros(3))


def test_shards_keep_each_source_tensors_outputs_together_and_respect_the_limit():
    groups = [[Output(f"w{i}", torch.float8_e4m3fn, (100,)), Output(f"w{i}_scale", torch.bfloat16, (1,))]
              for i in range(5)]
    assigned = shards.assign(groups, max_bytes=250)
    assert [len(s) for s in assigned] == [4, 4, 2]
    assert shards.shard_names(3) == ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                                     "model-00003-of-00003.safetensors"]
    index = shards.index(assigned, shards.shard_names(3))
    assert index["metadata"]["total_size"] == 5 * 102
    assert index["weight_map"]["w4_scale"] == "model-00003-of-00003.safetensors"


@pytest.mark.parametrize("seed", range(4))
def test_tensors_written_at_planned_offsets_in_any_order_give_save_file_bytes_and_hash(tmp_path, seed):
    import hashlib

    from builder.canonical import FileHash

    tensors = random_tensors(seed)
    save_file(tensors, tmp_path / "reference.safetensors", metadata={"format": "pt"})
    names = list(tensors)
    random.Random(seed).shuffle(names)
    planned = tensorfile.PlannedFile(tmp_path / "positioned.safetensors",
                                     [Output(n, tensors[n].dtype, tuple(tensors[n].shape)) for n in names])
    file_hash = FileHash(planned.fd)
    file_hash.add(*planned.header)
    for name in names:  # neither layout order nor name order
        file_hash.add(*planned.put(name, tensors[name]))
    digest = file_hash.digest(planned.size)
    planned.close()
    reference = (tmp_path / "reference.safetensors").read_bytes()
    assert (tmp_path / "positioned.safetensors").read_bytes() == reference
    assert digest == "sha256:" + hashlib.sha256(reference).hexdigest()


def test_a_file_hash_refuses_to_finish_before_every_byte_was_added(tmp_path):
    from builder.canonical import FileHash

    path = tmp_path / "f"
    path.write_bytes(b"abcdef")
    with open(path, "rb") as handle:
        file_hash = FileHash(handle.fileno())
        file_hash.add(3, memoryview(b"def"))  # beyond the hashed prefix: noted, read back later
        with pytest.raises(ValueError, match="hashed 0 of 6"):
            file_hash.digest(6)
        file_hash.add(0, memoryview(b"abc"))
        assert file_hash.digest(6).startswith("sha256:")
