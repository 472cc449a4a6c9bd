"""``aapo eval``: metrics against hand computations and brute force, the shipped benchmark sets, the Ray Data
pipeline on the embedded tiny model (local engines and an OpenAI-compatible endpoint), and bad input."""

import http.server
import itertools
import json
import math
import shutil
import subprocess
import sys
import threading

import pyarrow.parquet as pq
import pytest
import yaml
from math_verify import parse

from aapo_ray.cli import main
from aapo_ray.eval_cmd import render_for, run_config
from aapo_ray.eval_metrics import benchmark_metrics, final_answer, majority_vote, paper_table, pass_at_k
from aapo_ray.eval_sets import ALL_SETS, BENCHMARKS, PAPER_SETS, EvalInputError, load_eval_set, parse_benchmarks
from aapo_ray.sampling import problem_seed, row_seeds


# ----------------------------------------------------------------------------- metrics
def test_pass_at_k_equals_brute_force_over_all_subsets():
    for n in range(1, 7):
        for c in range(n + 1):
            flags = [1] * c + [0] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(range(n), k))
                brute = sum(any(flags[i] for i in s) for s in subsets) / len(subsets)
                assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12), (n, c, k)
    assert pass_at_k(1000, 1, 1) == pytest.approx(0.001)  # stable for large n
    assert 0 < pass_at_k(1024, 1, 3) < 1
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_majority_vote_ties_go_to_the_earliest_answer():
    assert majority_vote(["b", "a", "a", "b"]) == 0  # 2-2 tie: "b" was seen first
    assert majority_vote(["a", "b", "b", "a", "b"]) == 1  # a real majority wins regardless of order
    assert majority_vote(["c", None, "a", "a"]) == 2
    assert majority_vote([None, None, "z"]) == 2  # a sample without an answer never wins
    assert majority_vote([None, None]) is None


def test_final_answer_and_normalisation():
    assert final_answer("so \\boxed{ \\dfrac{1}{2} }.") == "\\frac{1}{2}"
    assert final_answer("x \\boxed{3} then \\boxed{\\left( 1, 2 \\right)}") == "(1,2)"
    assert final_answer("work\n#### 1,234") == "1234"
    assert final_answer("The answer is 42. Check: 6*7=42") == "42"
    assert final_answer("no answer here") is None


def test_benchmark_metrics_hand_computed():
    # problem 0: 2 of 4 correct, answers tie 5 vs 3 (5 first -> majority 5, correct)
    # problem 1: none correct, majority "2" (wrong); problem 2: 3 of 4 correct, majority "x" (correct)
    rows = {"problem_id": [], "sample": [], "correct": [], "answer": [], "length": [], "finish_reason": []}
    data = {0: ([1, 0, 0, 1], ["5", "3", "3", "5"]), 1: ([0, 0, 0, 0], [None, "2", "7", "2"]),
            2: ([1, 1, 1, 0], ["x", "x", "x", "y"])}
    for pid in (2, 0, 1):  # any order: rows come back from Ray Data unordered
        for s in (3, 1, 0, 2):
            rows["problem_id"].append(pid)
            rows["sample"].append(s)
            rows["correct"].append(float(data[pid][0][s]))
            rows["answer"].append(data[pid][1][s])
            rows["length"].append(10 * (pid + 1))
            rows["finish_reason"].append("length" if pid == 1 else "stop")
    m = benchmark_metrics(rows)
    assert (m["n"], m["k"]) == (3, 4)
    assert m["avg@k"] == pytest.approx((0.5 + 0 + 0.75) / 3)
    assert m["pass@k"]["1"] == pytest.approx(m["avg@k"])
    assert m["pass@k"]["2"] == pytest.approx((5 / 6 + 0 + 1) / 3)  # 1 - C(2,2)/C(4,2) = 5/6; n-c < k -> 1
    assert m["pass@k"]["3"] == pytest.approx((1 + 0 + 1) / 3)
    assert m["pass@k"]["4"] == pytest.approx(2 / 3)
    assert m["maj@k"] == pytest.approx(2 / 3)
    assert m["mean_length"] == pytest.approx(20.0)
    assert m["truncation_rate"] == pytest.approx(1 / 3)


def test_paper_table_layout():
    res = {"math500": {"avg@k": 0.5}, "aime24": {"avg@k": 0.1}, "gsm8k": {"avg@k": 0.9}}
    titles = {b.name: b.title for b in BENCHMARKS.values()}
    table = paper_table([("m", res)], titles, PAPER_SETS).splitlines()
    assert table[0] == "| model | AIME24 | MATH-500 | GSM8K | avg (paper sets) |"
    assert table[2] == "| m | 10.0 | 50.0 | 90.0 | 30.0 |"  # avg over the paper's sets only
    del res["gsm8k"]
    assert paper_table([("m", res)], titles, PAPER_SETS).splitlines()[0] == "| model | AIME24 | MATH-500 | avg |"


# ----------------------------------------------------------------------------- data
def test_every_shipped_benchmark_loads_with_its_size_and_parseable_golds():
    expected = {"math500": 500, "aime24": 30, "amc23": 40, "minerva": 272, "olympiadbench": 675, "gsm8k": 1319}
    assert set(expected) == set(ALL_SETS)
    for name, n in expected.items():
        ds = load_eval_set(parse_benchmarks(name)[0])
        assert len(ds) == n == BENCHMARKS[name].size and ds.skipped == 0, name
        unparsed = [g for g in ds.golds if not (parse("\\boxed{" + g + "}") or parse(g))]
        assert len(unparsed) <= n // 50, (name, unparsed[:5])  # a few non-LaTeX Minerva golds ("np.arcsin")
    assert len(load_eval_set(parse_benchmarks("aime24")[0], limit=4)) == 4
    assert [s.name for s in parse_benchmarks("MATH-500, olympiad,minerva_math")] == ["math500", "olympiadbench", "minerva"]


def test_run_directory_prompt_rendering(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "config.yaml").write_text('data:\n  train: x.jsonl\n  template: "Q: {question}\\nA:"\n')
    cfg = run_config(str(tmp_path / "checkpoints" / "step_000001"))
    assert render_for(cfg, None, ["1+1?"]) == ["Q: 1+1?\nA:"]
    assert render_for(None, None, ["1+1?"]) == ["1+1?\n"]  # plain dir, no chat template


# ----------------------------------------------------------------------------- bad input (before Ray starts)
def _fails(capsys, argv, *needles):
    assert main(["eval", *argv]) == 2
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, err


def test_bad_input_exits_2_with_a_clear_message(capsys, tmp_path):
    model = str(tmp_path)  # each check fails before the model directory is opened
    _fails(capsys, [model, "--benchmarks", "math500,nosuchset"], "unknown benchmark 'nosuchset'", "aime24", "gsm8k")
    bad = tmp_path / "mine.jsonl"
    bad.write_text('{"problem": "1+1", "answer": "2"}\n{"problem": "2+2"}\n')
    _fails(capsys, [model, "--benchmarks", str(bad)], str(bad), "row 1", "missing answer field 'answer'")
    _fails(capsys, [model, "--samples", "5000"], "--samples must be between 1 and 1024")
    _fails(capsys, [model, "--top-p", "0"], "--top-p")
    ck = tmp_path / "run" / "checkpoints" / "step_000002"
    (ck / "hf").mkdir(parents=True)
    (ck / "state.json").write_text("{}")
    (ck / "hf" / "config.json").write_text("{}")
    _fails(capsys, [str(tmp_path / "run")], "no model weights")
    _fails(capsys, [str(tmp_path / "run"), "--checkpoint", "step_9"], "no complete checkpoint with that step")
    _fails(capsys, [str(tmp_path / "nothing")], "no such directory")
    with pytest.raises(EvalInputError):
        parse_benchmarks(" , ")


# ----------------------------------------------------------------------------- the pipeline
def _load(out):
    results = json.loads((out / "results.json").read_text())
    return results, pq.read_table(out / "samples.parquet")


def test_pipeline_on_the_tiny_model_writes_results_samples_and_plot(ray_cluster, tiny_model_path, tmp_path, capsys):
    out = tmp_path / "a"
    assert main(["eval", str(tiny_model_path), "--benchmarks", "amc23,gsm8k", "--limit", "4", "--samples", "2",
                 "--out", str(out), "--quiet", "--max-new-tokens", "16"]) == 0
    printed = capsys.readouterr().out
    assert "| model | AMC23 | GSM8K | avg (paper sets) |" in printed
    results, samples = _load(out)
    assert samples.num_rows == 2 * 4 * 2
    assert {"benchmark", "problem_id", "sample", "prompt", "completion", "answer", "gold", "correct", "length",
            "finish_reason"} <= set(samples.schema.names)
    assert (out / "pass_at_k.png").stat().st_size > 0
    (label, res), = results["results"].items()
    for name in ("amc23", "gsm8k"):
        r = res[name]
        assert (r["n"], r["k"]) == (4, 2) and set(r["pass@k"]) == {"1", "2"}
        assert 0 <= r["avg@k"] <= r["pass@k"]["2"] <= 1 and 0 < r["mean_length"] <= 16
        rows = [x for x in samples.to_pylist() if x["benchmark"] == name]
        assert r["avg@k"] == pytest.approx(sum(x["correct"] for x in rows) / len(rows))
        assert r["truncation_rate"] == pytest.approx(sum(x["finish_reason"] == "length" for x in rows) / len(rows))
        assert r["budget_capped"] == 0 or r["prompts_cut"] >= 0  # the 128-token model caps long prompts
    assert results["settings"]["samples"] == 2 and results["wall_s"] > 0

    # the samples do not depend on batching or the number of actors (one seeded call per problem)
    out2 = tmp_path / "b"
    assert main(["eval", str(tiny_model_path), "--benchmarks", "amc23", "--limit", "4", "--samples", "2",
                 "--out", str(out2), "--quiet", "--max-new-tokens", "16", "--problems-per-batch", "1",
                 "--generators", "2"]) == 0
    key = lambda r: (r["problem_id"], r["sample"])  # noqa: E731
    first = sorted((r for r in samples.to_pylist() if r["benchmark"] == "amc23"), key=key)
    second = sorted(_load(out2)[1].to_pylist(), key=key)
    assert [r["completion"] for r in first] == [r["completion"] for r in second]


def test_the_aapo_script_evaluates_on_the_cluster_it_started_while_importing(tiny_model_path, tmp_path):
    """``aapo eval`` as a user runs it: the script starts its local cluster while it imports
    (``launch.start_ray_early``) and the evaluation's own ``init_ray`` joins that start (other arguments would
    raise there)."""
    out = tmp_path / "script"
    proc = subprocess.run([sys.executable, "-m", "aapo_ray", "eval", str(tiny_model_path), "--benchmarks",
                           "synthetic:test:4", "--samples", "1", "--max-new-tokens", "16", "--quiet", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results, samples = _load(out)
    assert samples.num_rows == 4 and results["results"][next(iter(results["results"]))]["synthetic-test-4"]["n"] == 4


class _FakeOpenAI(http.server.BaseHTTPRequestHandler):
    """Answers 27 to the requests seeded with ``seeds_of_27``, else 1; reports no usage."""
    requests: list = []
    seeds_of_27: set = set()

    def do_POST(self):  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append((self.path, body))
        answer = 27 if body["seed"] in self.seeds_of_27 else 1
        choices = [{"index": i, "text": f"so \\boxed{{{answer}}}", "finish_reason": "stop"} for i in range(body["n"])]
        data = json.dumps({"choices": choices}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_endpoint_mode_against_an_openai_compatible_server(ray_cluster, tiny_model_path, tmp_path):
    _FakeOpenAI.seeds_of_27 = {row_seeds(problem_seed(0, "amc23", i), 3)[0] for i in range(2)}  # sample 0 of each
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeOpenAI)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        out = tmp_path / "e"
        assert main(["eval", str(tiny_model_path), "--endpoint", f"http://127.0.0.1:{server.server_port}",
                     "--benchmarks", "amc23", "--limit", "2", "--samples", "3", "--out", str(out), "--quiet",
                     "--protocol", "paper"]) == 0
    finally:
        server.shutdown()
    assert len(_FakeOpenAI.requests) == 6  # one request per sample, each with its own seed
    assert len({body["seed"] for _, body in _FakeOpenAI.requests}) == 6
    path, body = _FakeOpenAI.requests[0]
    assert path == "/v1/completions" and body["n"] == 1 and body["temperature"] == 0.6 and body["top_p"] == 0.95
    assert isinstance(body["prompt"][0], int) and isinstance(body["seed"], int) and body["max_tokens"] >= 1
    results, samples = _load(out)
    r = results["results"][next(iter(results["results"]))]["amc23"]
    # amc23 problem 0's gold is 27: sample 0 of it is right, so avg@3 = 1/6, pass@3 = 1/2, maj@3 = 0 ("1" wins 2-1)
    assert samples.num_rows == 6
    assert r["avg@k"] == pytest.approx(1 / 6) and r["pass@k"]["3"] == pytest.approx(0.5)
    assert r["maj@k"] == pytest.approx(0.0) and math.isclose(r["pass@k"]["1"], 1 / 6)


def test_endpoint_mode_against_aapo_serve_matches_the_local_engines(ray_cluster, serve_app, tiny_model_path, tmp_path):
    """The same seeded samples whether the model runs in eval's own generators or behind ``aapo serve``:
    each sample is one request seeded with its row seed, and Serve samples each choice with its own seed."""
    args = ["--benchmarks", "gsm8k", "--limit", "3", "--samples", "2", "--max-new-tokens", "24", "--quiet",
            "--temperature", "1.0", "--top-p", "1.0"]
    with serve_app(str(tiny_model_path), "eval-endpoint") as url:
        assert main(["eval", str(tiny_model_path), "--endpoint", url, "--out", str(tmp_path / "served"), *args]) == 0
    assert main(["eval", str(tiny_model_path), "--out", str(tmp_path / "local"), *args]) == 0
    key = lambda r: (r["problem_id"], r["sample"])  # noqa: E731
    served, local = (sorted(_load(tmp_path / d)[1].to_pylist(), key=key) for d in ("served", "local"))
    assert len(served) == len(local) == 6
    assert [r["completion"] for r in served] == [r["completion"] for r in local]
    assert [r["finish_reason"] for r in served] == [r["finish_reason"] for r in local]
    assert [r["length"] for r in served] == [r["length"] for r in local]  # the server's usage
    assert len({r["completion"] for r in local}) > 1  # sampled, not one repeated string


def test_all_checkpoints_start_from_the_runs_initial_model_on_its_own_task(ray_cluster, tiny_model_path, tmp_path):
    """``--all-checkpoints`` evaluates the model the run started from as step_0, then every checkpoint;
    ``synthetic:test:N`` is the embedded task's held-out split, rendered as training rendered it."""
    run = tmp_path / "run"
    shutil.copytree(tiny_model_path, run / "checkpoints" / "step_3" / "hf")
    (run / "checkpoints" / "step_3" / "state.json").write_text(json.dumps({"step": 3}))
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"path": str(tiny_model_path)}}))
    out = tmp_path / "e"
    assert main(["eval", str(run), "--all-checkpoints", "--benchmarks", "synthetic:test:6", "--samples", "2",
                 "--max-new-tokens", "24", "--temperature", "0", "--out", str(out), "--quiet"]) == 0
    results, samples = _load(out)
    assert [m["label"] for m in results["models"]] == ["step_0", "step_3"]
    assert results["models"][0]["dir"] == str(tiny_model_path)
    res = results["results"]
    assert set(res["step_0"]) == {"synthetic-test-6"} and res["step_0"]["synthetic-test-6"]["n"] == 6
    # the same weights, greedy: the same answers, and the task's prompt template ("{question}\n")
    rows = samples.to_pylist()
    assert [r["completion"] for r in rows if r["model"] == "step_0"] == [r["completion"] for r in rows if r["model"] == "step_3"]
    assert all(r["prompt"].endswith("\n") for r in rows)
