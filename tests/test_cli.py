import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import rwkv_torch as rt
from rwkv_torch import cli
from rwkv_torch.checkpoints import save_official

README = Path(__file__).resolve().parents[1] / "README.md"
SRC = README.parent / "src"
# The README's language-model examples start from this official checkpoint; a tiny random one stands in for it.
README_CHECKPOINT = "RWKV-x070-World-0.1B-v2.8-20241210-ctx4096.pth"


def test_check_agrees():
    res = cli.check(frames=40, embed_dim=16)
    assert res["agree"] and res["rel_error"] < 1e-4 and res["p50_ms"] > 0


def test_main_check_exit_code(capsys):
    assert cli.main(["check", "--frames", "20", "--embed-dim", "8"]) == 0
    assert "agree" in capsys.readouterr().out


def test_demo_trains_samples_and_checks_step(tmp_path, capsys):
    res = cli.demo(seconds=4, out=str(tmp_path / "run"), max_tokens=24, progress=False)
    out = capsys.readouterr().out
    assert res["agree"] and res["rel_error"] < 1e-4 and res["p50_ms"] > 0
    assert res["step"] >= 1 and res["loss"] < 8.0  # nats/byte; uniform over 256 bytes is 5.5
    assert 0 < len(res["sample"].encode("utf-8", "surrogateescape")) <= 24 * 4 and res["sample"] in out
    assert (Path(res["model_dir"]) / "config.json").exists() and rt.load(res["model_dir"]).config.vocab_size == 256
    assert "bits/byte" in out and "latency" in out


def readme_cli_examples():
    """Lines of the README's bash blocks that run the CLI (a set-up line `... && rwkv-torch ...` counts too)."""
    examples, lang = [], None
    for line in README.read_text().splitlines():
        if line.startswith("```"):
            lang = None if lang is not None else (line[3:].strip() or "text")
            continue
        if lang == "bash":
            cmd = line.split("#")[0].split("&&")[-1].strip()
            if cmd.startswith("rwkv-torch "):
                examples.append(cmd)
    return examples


def readme_data_blocks():
    """The README's Python blocks that write example data files (``np.savez``) the CLI examples read."""
    return [b for b in re.findall(r"```python\n(.*?)```", README.read_text(), re.S) if "np.savez(" in b]


def test_readme_cli_examples_run(tmp_path):
    examples = readme_cli_examples()
    assert examples, "README has no rwkv-torch examples"
    for block in readme_data_blocks():
        exec(compile(block, "README.md", "exec"), {})
    tiny_world = rt.build(version=7, vocab_size=65536, hidden_size=32, num_layers=2, head_size=16, seed=0)
    save_official(tiny_world, tmp_path / README_CHECKPOINT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))}
    for line in examples:
        args = shlex.split(line)[1:]
        if args[0] == "generate" and importlib.util.find_spec("rwkv") is None:
            continue  # the World tokenizer needs the `rwkv` package (in the dev and lm extras)
        proc = subprocess.run([sys.executable, "-m", "rwkv_torch.cli", *args], capture_output=True, text=True,
                              timeout=300, cwd=tmp_path, env=env)
        assert proc.returncode == 0, f"{line!r} failed:\n{proc.stdout}\n{proc.stderr}"
