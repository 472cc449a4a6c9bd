"""The Arrow rollout schema: construction, columns, padding, sharding, object-store round trip."""

import numpy as np
import pyarrow as pa
import pytest
import torch

from aapo_ray.rollout import (ROLLOUT_SCHEMA, concat, make_rollout_batch, padded_tensors, shard,
                              with_columns, with_rewards)


def batch(seed=0, rows=6):
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, 50, rng.integers(1, 6)).tolist() for _ in range(rows)]
    completions = [rng.integers(3, 50, rng.integers(0, 7)).tolist() for _ in range(rows)]
    return make_rollout_batch(
        prompt_ids=prompts, completion_ids=completions, prompt_id=np.arange(rows) // 2,
        group_index=np.arange(rows) // 2, sample_index=np.arange(rows) % 2,
        prompt=["p"] * rows, completion=["c"] * rows, gold=["1"] * rows,
        finish_reason=["stop", "length"] * (rows // 2), weight_version=3), prompts, completions


def test_schema_and_padding_match_a_plain_loop():
    b, prompts, completions = batch()
    assert b.schema.equals(ROLLOUT_SCHEMA)
    t = padded_tensors(b, pad_id=0)
    width = max(len(p) + len(c) for p, c in zip(prompts, completions))
    assert t["input_ids"].shape == (6, width)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        seq = p + c
        assert t["input_ids"][i, :len(seq)].tolist() == seq
        assert (t["input_ids"][i, len(seq):] == 0).all()
        assert t["attention_mask"][i].tolist() == [1] * len(seq) + [0] * (width - len(seq))
        assert t["completion_mask"][i].tolist() == [0] * len(p) + [1] * len(c) + [0] * (width - len(seq))


def test_sliced_shards_pad_like_the_whole():
    b, _, _ = batch(rows=8)
    whole = padded_tensors(b, pad_id=0)
    for k, part in enumerate(shard(b, 4)):
        t = padded_tensors(part, pad_id=0)
        w = t["input_ids"].shape[1]
        assert torch.equal(t["input_ids"], whole["input_ids"][2 * k:2 * k + 2, :w])
        assert torch.equal(t["completion_mask"], whole["completion_mask"][2 * k:2 * k + 2, :w])
    with pytest.raises(ValueError, match="equal shards"):
        shard(b, 3)


def test_reward_and_advantage_columns_and_concat():
    b, _, _ = batch()
    scored = with_rewards(b, {"accuracy": np.array([1, 0, np.nan, 1, 0, 0])}, np.array([1, 0, 0, 1, 0, 0]))
    scored = with_columns(scored, advantage=torch.arange(6.0))
    assert scored.column("reward/accuracy").type == pa.float32()
    assert scored.column("advantage").to_pylist() == [0, 1, 2, 3, 4, 5]
    assert scored.column("finish_reason").to_pylist()[:2] == ["stop", "length"]
    both = concat([scored, scored])
    assert both.num_rows == 12 and both.schema.equals(scored.schema)
    with pytest.raises(ValueError, match="has 2 values for 6 rows"):
        with_columns(b, advantage=[1.0, 2.0])


def test_object_store_round_trip(ray_cluster):
    b, _, _ = batch(rows=200)
    got = ray_cluster.get(ray_cluster.put(b))
    assert got.equals(b)
    assert torch.equal(padded_tensors(got, 0)["input_ids"], padded_tensors(b, 0)["input_ids"])
