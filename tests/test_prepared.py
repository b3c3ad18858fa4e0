"""Prepared-dataset format: benchmark import, manifest checks, refusals, and the splits."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from data_prep.benchmark import main as import_benchmark
from elcrec_dist.data import eval_batch, eval_pair, left_pad, train_pairs
from elcrec_dist.prepared import MANIFEST_NAME, DatasetError, load_sequences, read_info

TINY = "10 1 2 3 4\n20 5 2 6 7 8\n30 3 1 9 2\n"
TINY_USERS = {10: [1, 2, 3, 4], 20: [5, 2, 6, 7, 8], 30: [3, 1, 9, 2]}


def write_text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def prepare(tmp_path: Path, text: str = TINY, *, name: str = "ds", shards: int = 1) -> Path:
    source = write_text(tmp_path / f"{name}.txt", text)
    out = tmp_path / name
    assert (
        import_benchmark(["--input", str(source), "--output", str(out), "--shards", str(shards)])
        == 0
    )
    return out


# --- import --------------------------------------------------------------------------------------


def test_import_writes_manifest_counts(tmp_path: Path) -> None:
    out = prepare(tmp_path)
    info = read_info(str(out))
    # 3 users; 4 + 5 + 4 = 13 interactions; largest item id 9 -> items 1..9
    assert info.num_users == 3
    assert info.num_interactions == 13
    assert info.num_items == 9 and info.max_item_id == 9
    assert info.padding_id == 0
    assert [f.rows for f in info.files] == [3]
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    entry = manifest["files"][0]
    assert entry["bytes"] == (out / entry["path"]).stat().st_size
    assert len(entry["sha256"]) == 64


def test_import_round_trips_items(tmp_path: Path) -> None:
    _, ids, seqs = load_sequences(str(prepare(tmp_path)))
    assert ids.tolist() == [10, 20, 30]
    assert [s.tolist() for s in seqs] == [TINY_USERS[10], TINY_USERS[20], TINY_USERS[30]]
    assert all(s.dtype == np.int64 for s in seqs)


def test_import_round_trips_over_several_shards(tmp_path: Path) -> None:
    users = {100 + u: [(u * 7 + j) % 23 + 1 for j in range(4 + u % 5)] for u in range(40)}
    text = "".join(f"{u} {' '.join(map(str, items))}\n" for u, items in users.items())
    out = prepare(tmp_path, text, shards=3)
    info, ids, seqs = load_sequences(str(out))
    assert len(info.files) == 3
    assert sum(f.rows for f in info.files) == 40 == info.num_users
    assert all(f.rows > 0 for f in info.files)  # 40 users hash into every one of 3 shards
    assert {int(u): s.tolist() for u, s in zip(ids, seqs, strict=True)} == users
    assert info.num_interactions == sum(len(v) for v in users.values())
    assert info.num_items == max(max(v) for v in users.values())


def test_beauty_import_counts_match_a_naive_read(shared_dir: Path, beauty_sequences) -> None:
    info, ids, seqs = beauty_sequences
    lines = (shared_dir / "data" / "Beauty.txt").read_text().splitlines()
    rows = [[int(t) for t in line.split()] for line in lines]
    assert info.num_users == len(rows) == len(seqs)
    assert info.num_interactions == sum(len(r) - 1 for r in rows)
    assert info.num_items == max(max(r[1:]) for r in rows) == 12101
    by_user = {int(u): s.tolist() for u, s in zip(ids, seqs, strict=True)}
    for r in rows[:50] + rows[-50:]:
        assert by_user[r[0]] == r[1:]


# --- malformed input: exit 2, file and line named, nothing written --------------------------------


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("1 1 2 3 4\n2 5 x 6 7\n", 2, "'x' is not an integer"),  # non-integer token
        ("1 1 2 3 4\n2 5 6 7 8.5\n", 2, "'8.5' is not an integer"),
        ("1 1 2 3 4\n2 5 6 7 8\n3 1 2 3\n", 3, "3 items; at least 4"),  # too few items
        ("1 1 2 3 4\n2 5 6 7 8\n1 9 9 9 9\n", 3, "user 1 appears again (first on line 1)"),
        ("1 1 2 3 4\n\n2 5 6 7 8\n", 2, "empty line"),
        ("1 1 2 3 4\n2 5 0 7 8\n", 2, ">= 1"),  # 0 is padding, not an item
    ],
)
def test_malformed_line_exits_2_naming_file_and_line_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, line: int, words: str
) -> None:
    source = write_text(tmp_path / "bad.txt", text)
    out = tmp_path / "out"
    assert import_benchmark(["--input", str(source), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{source}:{line}:" in err
    assert words in err
    assert not out.exists()


@pytest.mark.parametrize("token", ["1_0", "\u0663"])
def test_non_plain_decimal_tokens_are_rejected(tmp_path: Path, token: str) -> None:
    source = tmp_path / "odd.txt"
    source.write_text(f"1 1 2 3 4\n2 5 {token} 7 8\n", encoding="utf-8")
    out = tmp_path / "out"
    assert import_benchmark(["--input", str(source), "--output", str(out)]) == 2
    assert not out.exists()


def test_missing_input_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    missing = tmp_path / "nope.txt"
    assert import_benchmark(["--input", str(missing), "--output", str(out)]) == 2
    assert str(missing) in capsys.readouterr().err
    assert not out.exists()


def test_malformed_input_leaves_an_existing_output_folder_empty(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    source = write_text(tmp_path / "bad.txt", "1 1 2 3 4\n2 5 x\n")
    assert import_benchmark(["--input", str(source), "--output", str(out)]) == 2
    assert list(out.iterdir()) == []


# --- refusals on read ---------------------------------------------------------------------------


def test_folder_without_manifest_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"no manifest\.json; not a prepared dataset") as info:
        read_info(str(tmp_path))
    assert str(tmp_path) in str(info.value)


def test_shards_without_manifest_are_refused(tmp_path: Path) -> None:
    # an interrupted write: shards exist, the manifest (written last) does not
    out = prepare(tmp_path)
    (out / MANIFEST_NAME).unlink()
    assert any(out.glob("part-*.parquet"))
    with pytest.raises(DatasetError, match="manifest"):
        load_sequences(str(out))


def only_shard(out: Path) -> Path:
    (shard,) = out.glob("part-*.parquet")
    return shard


def test_tampered_shard_same_size_fails_sha256(tmp_path: Path) -> None:
    out = prepare(tmp_path)
    shard = only_shard(out)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte changed, size unchanged
    shard.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match="sha256") as info:
        load_sequences(str(out))
    assert shard.name in str(info.value)


def test_tampered_shard_other_size_fails_size_check(tmp_path: Path) -> None:
    out = prepare(tmp_path)
    shard = only_shard(out)
    size = shard.stat().st_size
    with shard.open("ab") as handle:
        handle.write(b"\0")
    with pytest.raises(DatasetError, match=rf"{size + 1} bytes, manifest says {size}"):
        load_sequences(str(out), verify=False)  # the size check does not need the hash


def test_missing_shard_is_refused(tmp_path: Path) -> None:
    out = prepare(tmp_path)
    shard = only_shard(out)
    shard.unlink()
    with pytest.raises(DatasetError, match=rf"{shard.name}, which is missing"):
        load_sequences(str(out))


def test_manifest_row_counts_must_add_up(tmp_path: Path) -> None:
    out = prepare(tmp_path)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    manifest["num_users"] = 4
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match="num_users=4"):
        read_info(str(out))


def test_foreign_manifest_format_is_refused(tmp_path: Path) -> None:
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(DatasetError, match="something-else"):
        read_info(str(tmp_path))


# --- no overwrite -------------------------------------------------------------------------------


def test_writing_over_an_existing_dataset_is_refused_and_the_old_one_is_intact(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = prepare(tmp_path)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    other = write_text(tmp_path / "other.txt", "7 1 2 3 4 5 6\n")
    assert import_benchmark(["--input", str(other), "--output", str(out)]) == 2
    assert "already holds a prepared dataset" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    _, ids, seqs = load_sequences(str(out))
    assert ids.tolist() == [10, 20, 30] and seqs[1].tolist() == TINY_USERS[20]


def test_stale_shards_of_an_unfinished_write_are_replaced(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    out.mkdir()
    (out / "part-00007-of-00009.parquet").write_bytes(b"half written")
    prepare(tmp_path)
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST_NAME, "part-00000-of-00001.parquet"]
    assert os.path.getsize(out / MANIFEST_NAME) > 0


# --- splits (elcrec_dist.data) by hand ----------------------------------------------------------

SEQ = np.arange(1, 9)  # [1, 2, 3, 4, 5, 6, 7, 8]


def test_train_pairs_by_hand() -> None:
    inputs, targets = train_pairs(SEQ)
    # seq[:-3] = [1..5], seq[1:-2] = [2..6]: each input position predicts the next item
    assert inputs.tolist() == [1, 2, 3, 4, 5]
    assert targets.tolist() == [2, 3, 4, 5, 6]
    # the shortest allowed user (4 items) keeps one training position
    assert [a.tolist() for a in train_pairs(np.array([4, 3, 2, 1]))] == [[4], [3]]


def test_eval_pairs_by_hand() -> None:
    history, answer = eval_pair(SEQ, "valid")
    assert history.tolist() == [1, 2, 3, 4, 5, 6] and answer == 7
    history, answer = eval_pair(SEQ, "test")
    assert history.tolist() == [1, 2, 3, 4, 5, 6, 7] and answer == 8  # includes the valid item


def test_left_pad_and_truncation_by_hand() -> None:
    padded = left_pad([SEQ, np.array([5, 6]), np.array([], dtype=np.int64)], 4)
    assert padded.tolist() == [[5, 6, 7, 8], [0, 0, 5, 6], [0, 0, 0, 0]]  # newest 4 kept
    # train input [1..5] and targets [2..6] at max_len 4 stay aligned
    inputs, targets = train_pairs(SEQ)
    assert left_pad([inputs], 4).tolist() == [[2, 3, 4, 5]]
    assert left_pad([targets], 4).tolist() == [[3, 4, 5, 6]]


def test_eval_batch_by_hand() -> None:
    seqs = [SEQ, np.array([9, 8, 7, 6])]
    test = eval_batch(seqs, "test", 4)
    assert test.inputs.tolist() == [[4, 5, 6, 7], [0, 9, 8, 7]]
    assert test.answers.tolist() == [8, 6]
    # exclusion uses the whole (untruncated) history, right-padded with 0
    assert test.history.tolist() == [[1, 2, 3, 4, 5, 6, 7], [9, 8, 7, 0, 0, 0, 0]]
    valid = eval_batch(seqs, "valid", 4)
    assert valid.inputs.tolist() == [[3, 4, 5, 6], [0, 0, 9, 8]]
    assert valid.answers.tolist() == [7, 7]
    assert valid.history.tolist() == [[1, 2, 3, 4, 5, 6], [9, 8, 0, 0, 0, 0]]
