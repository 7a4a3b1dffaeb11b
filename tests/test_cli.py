import subprocess
import sys
from pathlib import Path

from rwkv_torch import cli

README = Path(__file__).resolve().parents[1] / "README.md"


def test_demo_agrees():
    res = cli.demo(frames=40, embed_dim=16)
    assert res["agree"] and res["rel_error"] < 1e-4 and res["p50_ms"] > 0


def test_main_demo_exit_code(capsys):
    assert cli.main(["demo", "--frames", "20", "--embed-dim", "8"]) == 0
    assert "agree" in capsys.readouterr().out


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


def test_readme_cli_examples_run():
    examples = readme_cli_examples()
    assert examples, "README has no rwkv-torch examples"
    for line in examples:
        args = line.split()[1:]
        proc = subprocess.run([sys.executable, "-m", "rwkv_torch.cli", *args], capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, f"{line!r} failed:\n{proc.stdout}\n{proc.stderr}"
