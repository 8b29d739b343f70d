"""`miniinfer generate --local`: output formats and clear errors (exit code 2)."""

import json
import subprocess
import sys

import pytest


def cli(*args, timeout=180):
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_json_prompts_file_in_order(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "The capital of France is"}\n\n{"prompt": "def add(a, b):"}\n')
    r = cli("generate", "--local", "--json", "--max-tokens", "8", "--prompts-file", str(f))
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["prompt"] for row in rows] == ["The capital of France is", "def add(a, b):"]
    for row in rows:
        assert set(row) >= {"prompt_token_ids", "token_ids", "text", "finish_reason"}
        assert len(row["token_ids"]) <= 8 and row["prompt_token_ids"]
    assert rows[0]["text"].strip().startswith("Paris")
    assert "loaded smollm2-135m" in r.stderr


def test_streams_single_prompt_chat():
    r = cli("generate", "--local", "--chat", "--max-tokens", "12", "What is the capital of France?")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--model", "no-such-model", "hi"], "unknown model"),
        (["--max-tokens", "0", "hi"], "--max-tokens"),
        (["--temperature", "nan", "hi"], "--temperature"),
        (["--top-p", "1.5", "hi"], "top_p"),
        (["--prompts-file", "/nonexistent/p.jsonl"], "cannot read"),
        (["--kv-dtype", "int4", "hi"], "--kv-dtype"),
        ([], "no prompt"),
    ],
)
def test_bad_input_one_line_exit_2(args, needle):
    r = cli("generate", "--local", *args, timeout=60)
    assert r.returncode == 2
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], r.stderr


def test_bad_jsonl_line_named(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "ok"}\n{"prompt": 3}\n')
    r = cli("generate", "--local", "--prompts-file", str(f), timeout=60)
    assert r.returncode == 2 and ":2:" in r.stderr
