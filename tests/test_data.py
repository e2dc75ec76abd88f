"""The data module: local .txt/.jsonl/.parquet files and folders, token windows, named sets offline.

Every text here is prose written for these tests; none of it stands in for a real data set.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from _models import smollm2_dir

from quantize_cli import data
from quantize_cli.errors import QuantaError

PARAGRAPHS = [
    "The orchard behind the schoolhouse had three kinds of apple tree, and nobody remembered who planted them.",
    "In the dry summer the well ran low, so the children carried water from the creek in dented tin buckets.",
    "Winter brought the first snow in late November, and the road to the village stayed closed until March.",
    "When the thaw came the creek rose over its banks and left a line of pale silt across the lower field.",
]


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    # datasets caches local files too: keep that out of the user's cache (the config is read at import).
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.getbasetemp() / "hf-datasets")


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_txt_file_is_one_record_read_verbatim(tmp_path: Path) -> None:
    text = "\n\n".join(PARAGRAPHS) + "\n  trailing spaces and a last line\n"
    path = tmp_path / "story.txt"
    path.write_text(text)
    assert data.load_records(str(path)) == [text]
    assert data.load_text(str(path)) == text


def test_jsonl_records_joined_with_blank_lines(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "notes.jsonl", [{"text": p, "id": i} for i, p in enumerate(PARAGRAPHS)])
    assert data.load_records(str(path)) == PARAGRAPHS
    assert data.load_text(str(path)) == "\n\n".join(PARAGRAPHS)


def test_parquet_text_column(tmp_path: Path) -> None:
    path = tmp_path / "notes.parquet"
    pq.write_table(pa.table({"text": PARAGRAPHS, "n": list(range(len(PARAGRAPHS)))}), path)
    assert data.load_records(str(path)) == PARAGRAPHS


def test_folder_reads_every_type_in_name_order_and_skips_hidden(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text(PARAGRAPHS[0])
    _write_jsonl(tmp_path / "b.jsonl", [{"text": PARAGRAPHS[1]}, {"text": PARAGRAPHS[2]}])
    sub = tmp_path / "c"
    sub.mkdir()
    pq.write_table(pa.table({"text": [PARAGRAPHS[3]]}), sub / "d.parquet")
    (tmp_path / "ignored.md").write_text("not data")
    hidden = tmp_path / ".cache"
    hidden.mkdir()
    (hidden / "z.txt").write_text("a cache file that must not be read")
    assert data.load_records(str(tmp_path)) == PARAGRAPHS


def test_missing_text_field_names_the_file_and_columns(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "bad.jsonl", [{"body": "a record without the field"}])
    with pytest.raises(QuantaError, match=r"bad\.jsonl has no 'text' field \(found: body\)"):
        data.load_records(str(path))


def test_bad_inputs_are_one_line_errors(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("   \n")
    (tmp_path / "table.csv").write_text("text\nhello\n")
    (tmp_path / "nothing").mkdir()
    cases = {
        "no-such-set": "unknown data 'no-such-set'.*wikitext, c4, pile",
        str(tmp_path / "empty.txt"): "no text found",
        str(tmp_path / "table.csv"): "unsupported data file type",
        str(tmp_path / "nothing"): "no .txt, .jsonl, .parquet files",
    }
    for arg, message in cases.items():
        with pytest.raises(QuantaError, match=message) as err:
            data.load_records(arg)
        assert "\n" not in str(err.value)


def test_split_windows_drops_the_partial_window_and_caps_the_count() -> None:
    ids = torch.arange(103)
    w = data.split_windows(ids, 10)
    assert w.shape == (10, 10)
    assert torch.equal(w.reshape(-1), ids[:100])  # consecutive, non-overlapping
    assert torch.equal(data.split_windows(ids, 10, max_samples=3), ids[:30].reshape(3, 10))
    assert data.split_windows(ids, 10, max_samples=50).shape == (10, 10)
    with pytest.raises(QuantaError, match="fewer than one window"):
        data.split_windows(ids, 200)
    with pytest.raises(QuantaError, match="--seq-len must be at least 2"):
        data.split_windows(ids, 1)
    with pytest.raises(QuantaError, match="--max-samples must be at least 1"):
        data.split_windows(ids, 10, max_samples=0)


def test_token_windows_tokenize_the_whole_text_once(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    path = _write_jsonl(tmp_path / "notes.jsonl", [{"text": p} for p in PARAGRAPHS])
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    ids = tokenizer("\n\n".join(PARAGRAPHS))["input_ids"]  # the reference: one call on the joined text
    windows = data.token_windows(tokenizer, str(path), seq_len=16)
    n = len(ids) // 16
    assert windows.shape == (n, 16) and windows.dtype == torch.long
    assert windows.reshape(-1).tolist() == ids[: n * 16]


def test_sample_windows_are_slices_of_the_tokens() -> None:
    ids = torch.arange(1000) * 7
    w = data.sample_windows(ids, 32, 5, seed=3)
    assert w.shape == (5, 32)
    for row in w:
        start = int(row[0]) // 7
        assert torch.equal(row, ids[start : start + 32])
    assert torch.equal(w, data.sample_windows(ids, 32, 5, seed=3))


def test_named_sets_offline_give_one_line(tmp_path: Path) -> None:
    """Offline with empty caches: each named set fails with one line naming it and the local-file way out."""
    env = {
        **os.environ,
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
        "HF_DATASETS_CACHE": str(tmp_path / "hf-datasets"),
    }
    code = (
        "from quantize_cli import data\n"
        "from quantize_cli.errors import QuantaError\n"
        "for name in ('wikitext', 'c4', 'pile'):\n"
        "    for purpose in ('eval', 'calibration'):\n"
        "        try:\n"
        "            data.load_records(name, purpose)\n"
        "        except data.QuantaError as exc:\n"
        "            print(repr(str(exc)))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    messages = [ast.literal_eval(line) for line in proc.stdout.splitlines()]
    assert len(messages) == 6
    for msg, name in zip(messages, ["wikitext"] * 2 + ["c4"] * 2 + ["pile"] * 2, strict=True):
        assert "\n" not in msg
        assert msg.startswith(f"cannot fetch the {name} data set")
        assert "offline" in msg and "not in the datasets cache" in msg
        assert "pass a local file instead: --data PATH" in msg
    assert "Salesforce/wikitext:wikitext-2-raw-v1 test" in messages[0]
    assert "Salesforce/wikitext:wikitext-2-raw-v1 train" in messages[1]
