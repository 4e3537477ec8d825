"""How weights split into safetensors shards: which tensors go to which file, file names, the index."""

from builder.tensorfile import nbytes


def assign(groups: list, max_bytes: int) -> list:
    """Pack groups of outputs (one group per source tensor, kept together) into shards in order."""
    shards, current, size = [], [], 0
    for group in groups:
        group_size = sum(nbytes(o.dtype, o.shape) for o in group)
        if current and size + group_size > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.extend(group)
        size += group_size
    if current or not shards:
        shards.append(current)
    return shards


def shard_names(count: int) -> list:
    """Hugging Face's file names: model.safetensors, or model-0000i-of-0000n.safetensors."""
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def index(shards: list, names: list) -> dict:
    """model.safetensors.index.json for several shards."""
    weight_map = {o.name: file for outputs, file in zip(shards, names) for o in outputs}
    total = sum(nbytes(o.dtype, o.shape) for outputs in shards for o in outputs)
    return {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
