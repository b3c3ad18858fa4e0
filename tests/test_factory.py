"""The test-data factory (``conftest.write_prepared``, ``prepared_sets``): what it writes is what
the real entry point writes, sequences go in as given, and a cached set is written once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import PreparedSets, write_prepared

from data_prep.synthetic import SyntheticSpec
from data_prep.synthetic import main as synthetic_main
from elcrec_dist.prepared import load_sequences, read_info


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("shards", [2, 3])
def test_a_spec_writes_the_bytes_the_command_line_writes(tmp_path: Path, shards: int) -> None:
    args = ["--users", "90", "--items", "50", "--intents", "5", "--noise", "0.3", "--seed", "7"]
    cli = tmp_path / "cli"
    assert synthetic_main(["--output", str(cli), *args, "--shards", str(shards)]) == 0
    spec = SyntheticSpec(users=90, items=50, intents=5, noise=0.3, seed=7)
    ours = write_prepared(tmp_path / "ours", spec, shards=shards)
    assert ours == tmp_path / "ours"
    assert len(_files(cli)) == shards + 2  # the shards, the planted intents, the manifest
    assert _files(ours) == _files(cli)


def test_sequences_are_written_as_given_in_row_groups_of_the_size_asked(tmp_path: Path) -> None:
    seqs = [[3, 1, 4, 1], [5, 9, 2, 6, 5], [3, 5, 8, 9], [7, 9, 3, 2, 3, 8], [4, 6, 2, 6]]
    ids = [50, 10, 40, 20, 30]
    out = write_prepared(
        tmp_path / "ds", seqs, num_items=9, user_ids=ids, shards=1, rows_per_group=2
    )
    info, read_ids, read_seqs = load_sequences(str(out))
    assert (info.num_users, info.num_items, info.num_interactions) == (5, 9, 23)  # 4+5+4+6+4
    assert {u: s.tolist() for u, s in zip(read_ids.tolist(), read_seqs, strict=True)} == dict(
        zip(ids, seqs, strict=True)
    )
    (entry,) = info.files
    assert pq.ParquetFile(out / entry.path).metadata.num_row_groups == 3  # 2 + 2 + 1 users

    default = write_prepared(tmp_path / "ids", [np.array([1, 2, 3, 4])] * 3, num_items=4)
    assert sorted(load_sequences(str(default))[1].tolist()) == [1, 2, 3]  # ids 1..U
    assert len(read_info(str(default)).files) == 2  # the command line's two shards


def test_misuse_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="SyntheticSpec fixes"):
        write_prepared(tmp_path / "a", SyntheticSpec(users=10, items=40), num_items=40)
    with pytest.raises(TypeError, match="need num_items"):
        write_prepared(tmp_path / "b", [[1, 2, 3, 4]])
    assert list(tmp_path.iterdir()) == []


def test_a_cached_set_is_written_once_per_spec(prepared_sets: PreparedSets) -> None:
    spec = SyntheticSpec(users=30, items=40, intents=2, seed=11)
    first = prepared_sets(spec)
    stamps = {p.name: p.stat().st_mtime_ns for p in first.iterdir()}
    assert prepared_sets(SyntheticSpec(users=30, items=40, intents=2, seed=11)) == first
    assert {p.name: p.stat().st_mtime_ns for p in first.iterdir()} == stamps  # not rewritten
    other = prepared_sets(SyntheticSpec(users=30, items=40, intents=2, seed=12))
    three = prepared_sets(spec, shards=3)
    assert len({first, other, three}) == 3
    assert _files(first) != _files(other)
    assert len(read_info(str(three)).files) == 3
