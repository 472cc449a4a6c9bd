"""The rollout record batch: one Arrow schema for every sample that moves between roles.

Generators create batches (one row per completion), scorers add ``reward/<fn>`` and ``reward``
columns, the driver adds ``advantage``, learners read their shard and pad it into tensors with
vectorised numpy (no per-token Python). Token ids are ``list<int32>``; an Arrow batch goes into the
Ray object store as buffers, so readers map it without copying or unpickling token lists.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

if TYPE_CHECKING:  # torch is imported where tensors are made: scorer actors never need it
    import torch

TOKENS = pa.list_(pa.int32())
ROLLOUT_SCHEMA = pa.schema([
    pa.field("prompt_id", pa.int64(), nullable=False),    # id of the prompt in its data set
    pa.field("group_index", pa.int32(), nullable=False),  # which group (prompt) of the step
    pa.field("sample_index", pa.int32(), nullable=False), # i within the group (AAPO pairs by i)
    pa.field("prompt_ids", TOKENS, nullable=False),
    pa.field("completion_ids", TOKENS, nullable=False),   # up to and including the first EOS
    pa.field("prompt", pa.string()),
    pa.field("completion", pa.string()),
    pa.field("gold", pa.string()),
    pa.field("finish_reason", pa.dictionary(pa.int8(), pa.string())),  # "stop" | "length"
    pa.field("weight_version", pa.int64()),               # policy version that sampled it
])
REWARD_PREFIX = "reward/"
PROMPT_SCHEMA = pa.schema([  # a generation request: one row per prompt
    pa.field("prompt_id", pa.int64()),
    pa.field("prompt_ids", TOKENS),
    pa.field("prompt", pa.string()),
    pa.field("gold", pa.string()),
])


def token_list_array(sequences: list[list[int]] | list[np.ndarray]) -> pa.ListArray:
    """Build ``list<int32>`` from per-row token sequences (one concatenate, no per-token loop)."""
    lengths = np.fromiter((len(s) for s in sequences), dtype=np.int32, count=len(sequences))
    offsets = np.zeros(len(sequences) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.concatenate([np.asarray(s, dtype=np.int32) for s in sequences]) if len(sequences) else np.zeros(0, np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=pa.int32()))


def make_prompt_batch(prompt_ids: list, token_ids: list[list[int]], prompts: list[str], golds: list[str]) -> pa.RecordBatch:
    """The request a generator pool samples from: one row per prompt."""
    return pa.RecordBatch.from_arrays(
        [pa.array(np.asarray(prompt_ids, dtype=np.int64)), token_list_array(token_ids),
         pa.array(prompts, pa.string()), pa.array(golds, pa.string())], schema=PROMPT_SCHEMA)


def make_rollout_batch(*, prompt_ids: list, completion_ids: list, prompt_id, group_index, sample_index,
                       prompt: list[str], completion: list[str], gold: list[str],
                       finish_reason: list[str], weight_version: int) -> pa.RecordBatch:
    """One row per completion, in the order given."""
    n = len(completion_ids)
    columns = [
        pa.array(np.asarray(prompt_id, dtype=np.int64)),
        pa.array(np.asarray(group_index, dtype=np.int32)),
        pa.array(np.asarray(sample_index, dtype=np.int32)),
        token_list_array(prompt_ids),
        token_list_array(completion_ids),
        pa.array(prompt, pa.string()),
        pa.array(completion, pa.string()),
        pa.array(gold, pa.string()),
        pa.array(finish_reason, pa.string()).dictionary_encode().cast(ROLLOUT_SCHEMA.field("finish_reason").type),
        pa.array(np.full(n, weight_version, dtype=np.int64)),
    ]
    return pa.RecordBatch.from_arrays(columns, schema=ROLLOUT_SCHEMA)


def with_columns(batch: pa.RecordBatch, **columns) -> pa.RecordBatch:
    """Add or replace float32 columns (numpy / torch / lists); names may contain ``/``. The schema
    metadata (the generator's ``temperature``, ``generate_s``) is kept."""
    arrays = dict(zip(batch.schema.names, batch.columns))
    for name, values in columns.items():
        if hasattr(values, "detach"):  # a torch tensor
            values = values.detach().cpu().numpy()
        values = np.asarray(values, dtype=np.float32)
        if len(values) != batch.num_rows:
            raise ValueError(f"column {name!r} has {len(values)} values for {batch.num_rows} rows")
        arrays[name] = pa.array(values, type=pa.float32())
    return pa.RecordBatch.from_pydict(arrays).replace_schema_metadata(batch.schema.metadata)


def with_rewards(batch: pa.RecordBatch, per_function: dict[str, np.ndarray], total: np.ndarray) -> pa.RecordBatch:
    """Attach ``reward/<fn>`` columns (NaN where a function gave nothing) and the weighted ``reward``."""
    cols = {REWARD_PREFIX + name: values for name, values in per_function.items()}
    return with_columns(batch, **cols, reward=total)


def concat(batches: list[pa.RecordBatch]) -> pa.RecordBatch:
    """Concatenate batches with the same columns (one copy)."""
    return pa.Table.from_batches(batches).combine_chunks().to_batches()[0] if len(batches) > 1 else batches[0]


def column_numpy(batch: pa.RecordBatch, name: str) -> np.ndarray:
    """A numeric column as a numpy view (zero-copy when it has no nulls)."""
    return batch.column(name).to_numpy(zero_copy_only=False)


LEARNER_COLUMNS = ("prompt_ids", "completion_ids", "advantage")  # what a learner reads


def learner_batch(rollouts: pa.RecordBatch, advantages, temperature: float | None = None,
                  loss_weight=None) -> pa.RecordBatch:
    """The rows as the learners take them: token ids, ``advantage`` and (if given) the per-sequence
    ``loss_weight`` of ``algo.loss_agg``, with the sampling temperature in the metadata (the
    generators' own, unless ``temperature`` is given)."""
    if temperature is None:
        temperature = sampling_temperature(rollouts)
    extra = {} if loss_weight is None else {"loss_weight": loss_weight}
    batch = with_columns(rollouts.select(list(LEARNER_COLUMNS[:-1])), advantage=advantages, **extra)
    return batch.replace_schema_metadata({"temperature": repr(float(temperature))})


def sampling_temperature(batch: pa.RecordBatch) -> float:
    """The temperature the rows were sampled with, from the batch metadata a generator writes."""
    value = (batch.schema.metadata or {}).get(b"temperature")
    if value is None:
        raise ValueError("rollout batch has no 'temperature' in its metadata: build learner batches with "
                         "aapo_ray.rollout.learner_batch (log-probs must use the sampling temperature)")
    return float(value)


def _flat(list_array: pa.ListArray) -> tuple[np.ndarray, np.ndarray]:
    """(lengths, values) of a list<int32> column without copying the values."""
    offsets = list_array.offsets.to_numpy()
    values = list_array.values.to_numpy(zero_copy_only=True)[offsets[0]:offsets[-1]]
    return np.diff(offsets), values


def padded_tensors(batch: pa.RecordBatch, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``completion_mask`` (prompt + completion).

    ``completion_mask[i, t]`` is 1 where ``input_ids[i, t]`` is a completion token; the learner
    predicts token t from position t-1. Built with index arithmetic over the flat Arrow buffers.
    """
    import torch  # here, not at the top: scorer actors import this module and never need torch

    p_len, p_vals = _flat(batch.column("prompt_ids"))
    c_len, c_vals = _flat(batch.column("completion_ids"))
    rows, total = len(p_len), p_len + c_len
    width = int(total.max()) if rows else 0
    input_ids = np.full((rows, width), pad_id, dtype=np.int64)
    completion_mask = np.zeros((rows, width), dtype=np.float32)
    # prompt token j of row i goes to (i, j); completion token k to (i, p_len[i] + k)
    p_rows = np.repeat(np.arange(rows), p_len)
    p_pos = np.arange(len(p_vals)) - np.repeat(np.cumsum(p_len) - p_len, p_len)
    c_rows = np.repeat(np.arange(rows), c_len)
    c_pos = np.arange(len(c_vals)) - np.repeat(np.cumsum(c_len) - c_len, c_len) + np.repeat(p_len, c_len)
    input_ids[p_rows, p_pos] = p_vals
    input_ids[c_rows, c_pos] = c_vals
    completion_mask[c_rows, c_pos] = 1.0
    attention_mask = (np.arange(width)[None, :] < total[:, None]).astype(np.int64)
    return {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(attention_mask),
        "completion_mask": torch.from_numpy(completion_mask),
    }


def shard(batch: pa.RecordBatch, num_shards: int) -> list[pa.RecordBatch]:
    """Split rows into ``num_shards`` equal contiguous slices (zero-copy)."""
    if batch.num_rows % num_shards:
        raise ValueError(f"{batch.num_rows} rows do not split into {num_shards} equal shards")
    size = batch.num_rows // num_shards
    return [batch.slice(i * size, size) for i in range(num_shards)]
