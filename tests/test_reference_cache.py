"""The precomputed reference (issue 14): the build (Ray Data on the session cluster), its equivalence with
the online reference generator, resume, manifest checks, the draws, and a short training run reading it."""

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from aapo_ray.cli import main
from aapo_ray.collect import collect_scored
from aapo_ray.config import ConfigError, load_config
from aapo_ray.data import PromptSampler
from aapo_ray.driver import train
from aapo_ray.metrics import read_metrics
from aapo_ray.preflight import check_config, check_reference_cache, load_prompts
from aapo_ray.reference import ReferencePool
from aapo_ray.reference_build import build_reference_cache, shard_seed
from aapo_ray.reference_cache import MANIFEST, ReferenceCache, draw_samples, shard_name
from aapo_ray.rollout import column_numpy
from aapo_ray.scorer import ScorerPool

K, G = 4, 2


def ref_config(model_path, tmp, cache, **extra):
    overrides = {
        "model.path": model_path, "run.output_dir": str(tmp), "run.steps": 2, "run.save_every": 0,
        "run.eval_every": 0, "rollout.prompts_per_step": 2, "algo.group_size": G, "rollout.max_new_tokens": 8,
        "data.train": "synthetic:train:6", "data.eval": "", "learner.micro_batch_size": 8,
        "algo.reference": "precomputed", "algo.reference_samples": K, "algo.reference_shard_prompts": 2,
        "algo.reference_cache": str(cache), **extra,
    }
    return load_config(None, [f"{k}={v}" for k, v in overrides.items()])


@pytest.fixture(scope="module")
def precomputed_run(ray_cluster, tiny_model_path, tmp_path_factory):
    """``aapo train`` with algo.reference=precomputed and no cache yet: it builds the cache, then trains."""
    tmp = tmp_path_factory.mktemp("precomputed")
    cfg = ref_config(tiny_model_path, tmp, tmp / "cache")
    run_dir = train(cfg, run_dir=tmp / "run", progress=False)
    return cfg, run_dir, tmp / "cache"


def shards(cache):
    return {p.name: pq.read_table(p) for p in sorted(cache.glob("shard-*.parquet"))}


def test_train_builds_the_cache_then_trains_from_it(precomputed_run):
    cfg, run_dir, cache = precomputed_run
    manifest = json.loads((cache / MANIFEST).read_text())
    assert manifest["complete"] and manifest["samples"] == K and manifest["num_prompts"] == 6
    tables = shards(cache)
    assert list(tables) == [shard_name(i) for i in range(3)]  # 6 prompts, 2 per shard
    for t in tables.values():
        assert t.num_rows == 2 * K and t.column("sample_index").to_pylist() == list(range(K)) * 2
        assert {"reward", "reward/accuracy", "length", "finish_reason", "completion"} <= set(t.column_names)
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [0, 1, 2]
    for step, r in enumerate(rows[1:], start=1):
        assert r["time/ref_generate_s"] == 0.0 and r["reference/precomputed"] == 1.0
        assert r["reference/drawn_samples"] == step * cfg.rollout.prompts_per_step * G
        assert "margin_mean" in r and np.isfinite(r["learner/loss"])


def test_build_yields_exactly_the_online_reference_samples(precomputed_run, tiny_model_path):
    """Same seed, same prompts: a shard's rows are what the online ReferencePool generates and the training
    scorer scores for the shard's prompts as one chunk with n = K and the shard's seed (the build's seed
    convention, reference_build docstring)."""
    cfg, _, cache = precomputed_run
    prompts, _ = load_prompts(cfg, tiny_model_path)
    want = pq.read_table(cache / shard_name(1))  # prompts 2 and 3, sorted by (prompt_id, sample_index)
    reference, scorers = ReferencePool(cfg, tiny_model_path), ScorerPool(cfg)
    try:
        chunks = reference.chunks(prompts.slice(2, 2), K, reference.sampling(shard_seed(cfg, 1)))
        online = collect_scored([(reference, chunks)], scorers)[0][0][0]
    finally:
        reference.shutdown()
        scorers.shutdown()
    assert column_numpy(online, "prompt_id").tolist() == want.column("prompt_id").to_pylist()
    assert column_numpy(online, "sample_index").tolist() == want.column("sample_index").to_pylist()
    assert online.column("completion").to_pylist() == want.column("completion").to_pylist()
    assert len(set(want.column("completion").to_pylist())) > 1  # sampled, not one repeated string
    for name in ("reward", "reward/accuracy"):
        assert column_numpy(online, name).tolist() == want.column(name).to_pylist(), name
    assert online.column("finish_reason").to_pylist() == want.column("finish_reason").to_pylist()
    assert np.diff(online.column("completion_ids").offsets.to_numpy()).tolist() == want.column("length").to_pylist()


def test_a_killed_build_resumes_without_rebuilding_finished_shards(precomputed_run, tiny_model_path, tmp_path):
    cfg, _, cache = precomputed_run
    partial = tmp_path / "partial"
    shutil.copytree(cache, partial)
    manifest = json.loads((partial / MANIFEST).read_text())
    (partial / MANIFEST).write_text(json.dumps({**manifest, "complete": False}))  # killed mid-way
    (partial / shard_name(1)).unlink()
    (partial / (shard_name(1) + ".tmp")).write_bytes(b"torn write")
    kept = {n: (partial / n).stat().st_mtime_ns for n in (shard_name(0), shard_name(2))}
    cfg = ref_config(tiny_model_path, tmp_path, partial)
    prompts, _ = load_prompts(cfg, tiny_model_path)
    build_reference_cache(cfg, tiny_model_path, prompts, check_reference_cache(cfg, tiny_model_path, prompts),
                          progress=False)
    assert {n: (partial / n).stat().st_mtime_ns for n in kept} == kept  # finished shards not regenerated
    assert not list(partial.glob("*.tmp")) and json.loads((partial / MANIFEST).read_text())["complete"]
    rebuilt, original = shards(partial), shards(cache)
    assert list(rebuilt) == list(original)
    for name in original:
        assert rebuilt[name].equals(original[name]), name


@pytest.mark.parametrize("change, field", [({"rollout.temperature": 0.7}, "sampling.temperature"),
                                           ({"algo.reference_seed": 3}, "seed"),
                                           ({"reward.functions": "{accuracy: 1.0, format: 0.5}"}, "reward.functions"),
                                           ({"data.train": "synthetic:train:5"}, "data")])
def test_a_cache_built_for_another_run_is_refused_naming_the_field(precomputed_run, tiny_model_path, tmp_path,
                                                                   change, field):
    _, _, cache = precomputed_run
    cfg = ref_config(tiny_model_path, tmp_path, cache, **change)
    with pytest.raises(ConfigError, match=rf"algo\.reference_cache: .*\b{field}: cache has"):
        train(cfg, run_dir=tmp_path / "run", progress=False)  # refused in preflight, before any actor
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_reference_build_command_on_a_complete_cache(precomputed_run, tiny_model_path, tmp_path, capsys):
    cfg, _, cache = precomputed_run
    before = {n: p.stat().st_mtime_ns for n, p in ((p.name, p) for p in cache.iterdir())}
    argv = ["reference", "build", "--no-progress", f"model.path={tiny_model_path}", "data.train=synthetic:train:6",
            "rollout.prompts_per_step=2", "rollout.max_new_tokens=8", f"algo.reference_samples={K}", f"algo.reference_cache={cache}"]
    assert main(argv) == 0
    assert f"reference cache: {cache} (6 prompts x {K} samples)" in capsys.readouterr().out
    assert {n: p.stat().st_mtime_ns for n, p in ((p.name, p) for p in cache.iterdir())} == before
    assert main(argv + ["rollout.top_p=0.9"]) == 2  # a mismatch: exit 2 with the field named
    assert "sampling.top_p: cache has 1.0, this run 0.9" in capsys.readouterr().err


def test_draws_are_without_replacement_across_visits_then_a_fresh_permutation():
    visits = [draw_samples(6, 2, seed=7, prompt_id=11, visit=v) for v in range(6)]
    assert sorted(np.concatenate(visits[:3]).tolist()) == list(range(6))  # 3 visits use all 6 samples once
    assert sorted(np.concatenate(visits[3:]).tolist()) == list(range(6))  # then a new cycle, again all once
    assert not all(np.array_equal(a, b) for a, b in zip(visits[:3], visits[3:]))  # a fresh permutation
    again = [draw_samples(6, 2, seed=7, prompt_id=11, visit=v) for v in range(6)]
    assert all(np.array_equal(a, b) for a, b in zip(visits, again))  # seeded
    assert not np.array_equal(draw_samples(6, 2, 8, 11, 0), draw_samples(6, 2, 7, 11, 0)) or \
        not np.array_equal(draw_samples(6, 2, 8, 11, 1), draw_samples(6, 2, 7, 11, 1))  # the run seed matters
    odd = [draw_samples(5, 2, 0, 1, v) for v in range(2)]  # K=5, G=2: 2 disjoint visits, then a new cycle
    assert len(set(np.concatenate(odd).tolist())) == 4 and all(len(set(d.tolist())) == 2 for d in odd)


def test_a_prompts_visit_number_counts_its_earlier_draws():
    sampler, seen = PromptSampler(4, 3, seed=5), {}
    for _ in range(4):  # 12 draws: 3 epochs of 4 prompts, batches crossing epoch boundaries
        for index, visit in zip(*sampler.next_batch_with_visits()):
            assert visit == seen.get(index, 0)
            seen[index] = visit + 1
    assert seen == {0: 3, 1: 3, 2: 3, 3: 3}


def test_drawn_batch_pairs_visits_with_stored_rewards(precomputed_run):
    cfg, _, cache = precomputed_run
    ref = ReferenceCache(cache, G, cfg.run.seed)
    table = pq.read_table(cache / shard_name(0)).to_pylist()
    pid = table[0]["prompt_id"]
    seen = []
    for visit in range(K // G):
        batch = ref.draw([pid], [visit])
        assert batch.column("group_index").to_pylist() == [0] * G
        assert batch.column("sample_index").to_pylist() == list(range(G))
        samples = batch.column("cache_sample").to_pylist()
        assert batch.column("reward").to_pylist() == [table[s]["reward"] for s in samples]
        seen += samples
    assert sorted(seen) == list(range(K)) and ref.drawn == K


def test_config_checks(tmp_path):
    with pytest.raises(ConfigError, match=r"algo.reference_samples=1 < algo.group_size=2"):
        ref_config("embedded", tmp_path, tmp_path, **{"algo.reference_samples": 1})
    with pytest.raises(ConfigError, match=r"algo.reference: precomputed, but algo.estimator=grpo"):
        check_config(ref_config("embedded", tmp_path, tmp_path, **{"algo.estimator": "grpo"}))
    assert load_config(None, []).algo.reference == "online"  # online stays the default
