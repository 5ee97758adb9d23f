"""The command line: output, flags, and one-line errors without tracebacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from tests.factories import load_reference
from tpi.cli import cli


def run(*args: str, input: str | None = None):
    return CliRunner().invoke(cli, list(args), input=input, catch_exceptions=False)


def _reference_greedy_text(model_dir: Path, prompt: str, n: int) -> str:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    ids = tok.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
    )
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    model = load_reference(model_dir)
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=2, pad_token_id=0
        )
    return tok.decode(out[0, len(ids) :], skip_special_tokens=True)


def test_generate_streams_the_reference_answer(llama_dir):
    res = run(
        "generate", "--model", str(llama_dir), "-n", "12", "--temperature", "0", "Hello world"
    )
    assert res.exit_code == 0, res.output
    assert res.stdout.rstrip("\n") == _reference_greedy_text(llama_dir, "Hello world", 12)


def test_generate_raw_and_stdin(llama_dir):
    a = run("generate", "--model", str(llama_dir), "-n", "5", "--raw", "Hello")
    b = run("generate", "--model", str(llama_dir), "-n", "5", "--raw", "-", input="Hello")
    assert a.exit_code == 0 and a.stdout == b.stdout


def test_seeded_sampling_is_reproducible(llama_dir):
    args = ["generate", "--model", str(llama_dir), "-n", "12", "-t", "1.0", "--seed", "5", "Hello"]
    assert run(*args).stdout == run(*args).stdout


def test_chat_repl_commands(llama_dir):
    script = (
        "Hello world\n/help\n/bogus\nWhat is the capital of France?\n/reset\nHello world\n/exit\n"
    )
    res = run("chat", "--model", str(llama_dir), "-n", "6", input=script)
    assert res.exit_code == 0, res.output
    assert "(conversation cleared)" in res.stderr
    assert "unknown command /bogus" in res.stderr
    assert res.stderr.count("tok/s") == 3
    # The prompt "> " is printed before each line read; answers follow it.
    answers = [a for a in res.stdout.split("> ") if a.strip()]
    assert len(answers) == 3
    # After /reset the same message gets the same greedy answer as the first time,
    # and the second answer (with history) is a different generation.
    assert answers[0] == answers[2]


def test_chat_ends_on_eof(llama_dir):
    res = run("chat", "--model", str(llama_dir), "-n", "3", input="Hello\n")
    assert res.exit_code == 0


@pytest.mark.parametrize("command", ["generate", "chat", "convert-gguf", "models"])
def test_help_explains_every_option(command):
    res = run(command, "--help")
    assert res.exit_code == 0
    for param in cli.get_command(None, command).params:
        if isinstance(param, __import__("click").Option):
            assert param.help, f"{command} {param.name} has no help"
            assert param.opts[0] in res.output


def _one_line_error(res) -> str:
    assert res.exit_code != 0
    assert "Traceback" not in res.output
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, res.stderr
    return lines[0]


def test_missing_model_dir(tmp_path):
    line = _one_line_error(run("generate", "--model", str(tmp_path / "nope"), "hi"))
    assert "model not found" in line


def test_missing_config(tmp_path):
    line = _one_line_error(run("generate", "--model", str(tmp_path), "hi"))
    assert "no config.json" in line


def test_unknown_architecture_is_named(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    )
    line = _one_line_error(run("generate", "--model", str(tmp_path), "hi"))
    assert "GPT2LMHeadModel" in line


@pytest.mark.parametrize("damage", ["truncate", "header"])
def test_corrupt_safetensors(llama_dir, tmp_path, damage):
    d = tmp_path / "m"
    d.mkdir()
    for f in llama_dir.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    w = d / "model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\xff" * 16 + data[16:])
    line = _one_line_error(run("generate", "--model", str(d), "hi"))
    assert "safetensors" in line and "model.safetensors" in line


def test_empty_prompt(llama_dir):
    line = _one_line_error(run("generate", "--model", str(llama_dir), "   "))
    assert "empty" in line


def test_bad_sampling_flag(llama_dir):
    res = run("generate", "--model", str(llama_dir), "--top-p", "2", "hi")
    assert res.exit_code == 2 and "top-p" in res.output and "Traceback" not in res.output


def test_real_subprocess_default_model_knows_paris(smollm_dir):
    """The installed `tpi` script, the embedded model, a real process."""
    exe = Path(sys.executable).parent / "tpi"
    res = subprocess.run(
        [str(exe), "generate", "-t", "0", "What is the capital of France?"],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ),
    )
    assert res.returncode == 0, res.stderr
    assert "Paris" in res.stdout
