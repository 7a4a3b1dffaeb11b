import importlib.util
import json
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rwkv_torch as rt
from rwkv_torch import cli
from rwkv_torch.checkpoints import save_official
from rwkv_torch.tokenizer import ByteTokenizer

README = Path(__file__).resolve().parents[1] / "README.md"
SRC = README.parent / "src"
# The README's replay examples read ../shared/data/slippi (the shared replays beside a checkout); the tests run them
# on the small copies in tests/data/slippi, so the suite needs nothing outside the repository.
README_REPLAYS, TEST_REPLAYS = "../shared/data/slippi", str(README.parent / "tests" / "data" / "slippi")
UNIFORM_BYTE_LOSS = math.log(256)  # nats/byte of a model that knows nothing: an untrained one starts near it
# The README's language-model examples start from this official checkpoint; a tiny random World model (vocab 65536)
# saved in the official format under its name stands in for it.
README_CHECKPOINT = "RWKV-x070-World-0.1B-v2.8-20241210-ctx4096.pth"
# Flags appended to the README's examples (a later flag overrides the README's own) so that each runs in seconds;
# nothing else about an example changes. Subcommands not listed run exactly as written.
README_OVERRIDES = {
    "demo": ["--seconds", "1"],  # 60 s (the default) and 10 s of training -> 1 s, still sized by the timing probe
    # the default 5.2M-parameter backbone over 500 frames in two runtimes takes ~1 min: a tiny one over 50 frames
    "stream-bench": ["--frames", "50", "--embed-dim", "16", "--hidden-size", "64", "--num-layers", "2"],
    "bot": ["--no-kernels"],  # three builds of the C kernels (~15 s of CPU); the slow pass builds them
    "serve": ["--port", "0"],  # --check binds the port: any free one (8000 may be taken where the tests run)
}


def test_check_agrees():
    res = cli.check(frames=40, embed_dim=16)
    assert res["agree"] and res["rel_error"] < 1e-4
    assert res["frames"] == 40 and 0 < res["p50_ms"] <= res["p99_ms"]


def test_main_check_exit_code(capsys):
    assert cli.main(["check", "--frames", "20", "--embed-dim", "8"]) == 0
    out = capsys.readouterr().out
    assert "parallel forward over 20 frames" in out and "-> agree" in out


def test_demo_trains_samples_and_checks_step(tmp_path, capsys):
    steps = 12  # a fixed count: the same run on any machine (no time limit with steps given)
    res = cli.demo(out=str(tmp_path / "run"), max_tokens=24, progress=False, steps=steps)
    out = capsys.readouterr().out
    assert res["step"] == steps and f"for {steps} steps" in out and f"{steps} steps: loss" in out
    # nats/byte; uniform over 256 bytes is 5.55 and the first step's loss is ~5.7
    assert res["loss"] < UNIFORM_BYTE_LOSS - 1.0 and res["val_loss"] < UNIFORM_BYTE_LOSS - 1.0
    logged = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["step"] == steps and logged[-1]["loss"] < logged[0]["loss"]
    assert res["agree"] and res["rel_error"] < 1e-4 and 0 < res["p50_ms"] <= res["p99_ms"]
    assert 0 < len(res["sample"].encode("utf-8", "surrogateescape")) <= 24 * 4 and res["sample"] in out
    tokens = len(ByteTokenizer().encode(cli.DEMO_PROMPT + res["sample"])[:256])
    assert res["timed_steps"] == tokens - 8  # every position of prompt + sample stepped, the first 8 untimed
    assert (Path(res["model_dir"]) / "config.json").exists() and rt.load(res["model_dir"]).config.vocab_size == 256
    assert "bits/byte" in out and "latency" in out


def test_demo_stopped_by_its_time_limit_says_so(tmp_path, capsys, monkeypatch):
    from rwkv_torch import demo as demo_module

    monkeypatch.setattr(demo_module, "_demo_steps", lambda *a: 100_000)  # more steps than the time limit allows
    res = cli.demo(seconds=0.5, out=str(tmp_path / "run"), max_tokens=4, progress=False)
    out = capsys.readouterr().out
    assert 0 < res["step"] < res["planned_steps"] == 100_000
    assert f"the time limit stopped it at {res['step']} of 100000 planned steps" in out


def test_demo_flags_reach_demo_and_set_exit_code(monkeypatch):
    calls = []

    def fake_demo(*args):
        calls.append(args)
        return {"agree": len(calls) == 1}

    monkeypatch.setattr(cli, "demo", fake_demo)
    assert cli.main(["demo", "--steps", "7", "--seconds", "3", "--no-progress"]) == 0
    assert cli.main(["demo"]) == 1  # step and parallel forward disagree -> exit code 1
    seconds, out, prompt, max_tokens, seed, threads, progress, temperature, top_p, steps = calls[0]
    assert (seconds, steps, progress, max_tokens, seed, threads, top_p) == (3.0, 7, False, 300, 0, None, 0.85)
    assert calls[1][0] == 60.0 and calls[1][-1] is None  # defaults: 60 s, steps from the time


def test_stream_bench_reports_what_was_asked(capsys):
    rows = cli.stream_bench(frames=30, embed_dim=8, hidden_size=64, num_layers=1, onnx=False)
    assert [r["runtime"] for r in rows] == ["pytorch"] and rows[0]["frames"] == 30
    assert 0 < rows[0]["p50_ms"] <= rows[0]["p99_ms"] and rows[0]["mean_ms"] > 0
    assert "| pytorch |" in capsys.readouterr().out


def test_module_entry_point_exit_code(tmp_path):
    """``python -m rwkv_torch.cli`` (what the ``rwkv-torch`` script runs) passes main's exit code to the shell."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "rwkv_torch.cli", "info", str(tmp_path / "missing")],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2 and "rwkv-torch info: error:" in proc.stderr, proc.stderr


def readme_cli_examples():
    """Lines of the README's bash blocks that run the CLI (a set-up line `... && rwkv-torch ...` counts too), as
    argument lists after ``rwkv-torch``."""
    examples, lang = [], None
    for line in README.read_text().splitlines():
        if line.startswith("```"):
            lang = None if lang is not None else (line[3:].strip() or "text")
            continue
        if lang == "bash":
            words = shlex.split(line, comments=True)
            while "&&" in words:
                words = words[words.index("&&") + 1:]
            if words[:1] == ["rwkv-torch"]:
                examples.append(words[1:])
    return examples


def readme_data_blocks():
    """The README's Python blocks that write example data files (``np.savez``) the CLI examples read."""
    return [b for b in re.findall(r"```python\n(.*?)```", README.read_text(), re.S) if "np.savez(" in b]


def readme_run_blocks():
    """The README's Python blocks that use what the CLI examples wrote (a trained run: ``from_run``; a converted
    Hugging Face folder: ``from_pretrained``)."""
    return [b for b in re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
            if "from_run(" in b or "from_pretrained(" in b]


def readme_paths(text: str, tmp: str) -> str:
    """A README example's paths as the test runs it: ``/tmp/`` under ``tmp``, the shared replays -> the test copies."""
    text = text.replace("/tmp/", tmp).replace(README_REPLAYS, TEST_REPLAYS)
    assert "../shared" not in text, f"a README example reads ../shared outside {README_REPLAYS}: {text}"
    return text


@pytest.mark.parametrize("overrides", [pytest.param(README_OVERRIDES, id="tiny"),
                                       pytest.param({}, id="as-written", marks=pytest.mark.slow)])  # ~3 min
def test_readme_cli_examples_run(overrides, tmp_path, monkeypatch, capsys):
    """Every ``rwkv-torch`` line of the README's bash blocks runs and exits 0, in order (later examples read what
    earlier ones wrote), through ``cli.main`` in this process (the ``rwkv-torch`` script's own call), with the flags
    of ``overrides`` appended (none in the slow pass) and the README's ``/tmp/`` paths moved under ``tmp_path``."""
    examples = readme_cli_examples()
    assert {e[0] for e in examples} == set(cli.COMMANDS), "every subcommand has a README example, and only they"
    tmp = f"{tmp_path}/"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RWKV_TORCH_CACHE", str(tmp_path / "cache"))  # parsed replays: not in the user's cache
    for block in readme_data_blocks():
        exec(compile(block.replace("/tmp/", tmp), "README.md", "exec"), {})
    tiny_world = rt.build(version=7, vocab_size=65536, hidden_size=32, num_layers=2, head_size=16, seed=0)
    save_official(tiny_world, tmp_path / README_CHECKPOINT)
    if any(e[0] == "generate" for e in examples):
        # Not a skip: without it the README's generate examples cannot run, and this test exists to run them.
        assert importlib.util.find_spec("rwkv") is not None, (
            "the README's generate examples decode with the RWKV World tokenizer of the `rwkv` package (dev extra): "
            "pip install -e '.[dev]'")
    threads = torch.get_num_threads()
    for words in examples:
        args = [readme_paths(w, tmp) for w in words]
        args += overrides.get(words[0], [])
        code = cli.main(args)
        torch.set_num_threads(threads)  # an example's --threads is for that example (oversubscribed, 10x slower)
        out, err = capsys.readouterr()
        assert code == 0, f"rwkv-torch {shlex.join(words)} (run as {shlex.join(args)}) exited {code}:\n{out}\n{err}"
    for block in readme_run_blocks():
        exec(compile(readme_paths(block, tmp), "README.md", "exec"), {})
    assert not readme_run_blocks() or (tmp_path / "rwkv_runs" / "melee" / "policy.onnx").stat().st_size > 0


@pytest.mark.parametrize("argv, flag", [
    (["check", "--frames", "0"], "--frames"),
    (["check", "--embed-dim", "0"], "--embed-dim"),
    (["stream-bench", "--frames", "0"], "--frames"),
    (["demo", "--seconds", "0"], "--seconds"),
    (["demo", "--steps", "0"], "--steps"),
])
def test_bad_sizes_are_one_line_naming_the_flag(argv, flag, capsys):
    assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == f"rwkv-torch {argv[0]}: error: {flag} must be > 0, got 0\n"


def test_version_and_a_light_import():
    run = subprocess.run([sys.executable, "-m", "rwkv_torch.cli", "--version"], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(SRC)))
    assert run.returncode == 0 and run.stdout == f"rwkv-torch {rt.__version__}\n", run
    # `import rwkv_torch` (and so `rwkv-torch --help`) must not import torch._dynamo (~5 s)
    code = "import sys, rwkv_torch; print('torch._dynamo' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(SRC)))
    assert run.stdout == "False\n", run
    from rwkv_torch.ops import cpu_lib

    # what torch.compiler.assume_constant_result would set, set without importing torch._dynamo
    assert getattr(torch.compiler.assume_constant_result(lambda: 0), "_dynamo_marked_constant", False)
    assert cpu_lib.available._dynamo_marked_constant is True


@pytest.mark.parametrize("signum,code", [(2, 130), (15, 143), (None, 130)])
def test_an_interrupted_train_exits_with_the_signal_code(monkeypatch, signum, code):
    """`train` stopped by a signal exits 128 + the signal (130 for Ctrl-C), not 0 like a finished run."""
    from rwkv_torch import cli as cli_module

    seen = {}

    def fake(args):
        seen["overwrite"] = args.overwrite
        return dict(interrupted=True, signal=signum, rank=0)

    monkeypatch.setattr(cli_module, "train_and_report", fake)
    assert cli_module.main(["train", "--steps", "3", "--overwrite"]) == code
    assert seen["overwrite"] is True
