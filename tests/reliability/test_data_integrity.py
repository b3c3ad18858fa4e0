"""Shard checksums (issue 20, item 6): the trainer refuses a dataset whose files differ from the
sha256 its manifest records, before anything is written; each rank hashes its share."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import PreparedSets
from faults import DATA, train

from elcrec_dist.errors import EXIT_PERMANENT
from elcrec_dist.stream import StreamingDataset


@pytest.fixture
def flipped(prepared_sets: PreparedSets, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the tiny dataset with one bit flipped in the middle of its second shard (the
    size, the footer and the manifest unchanged); returns (dataset, shard)."""
    data = tmp_path / "data"
    shutil.copytree(prepared_sets(DATA), data)
    shard = sorted(data.glob("*.parquet"))[1]
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0x04
    shard.write_bytes(bytes(raw))
    return data, shard


def test_each_rank_hashes_its_share_and_the_shares_cover_every_file(
    flipped: tuple[Path, Path], prepared_sets: PreparedSets
) -> None:
    data, shard = flipped
    dataset = StreamingDataset.open(str(data))  # sizes and footers still agree
    files = len(dataset.info.files)
    assert files >= 2
    found = [dataset.verify_checksums(rank=r, world=2) for r in range(2)]
    owner = sorted(data.glob("*.parquet")).index(shard) % 2
    assert [len(f) for f in found] == [int(r == owner) for r in range(2)]
    assert shard.name in found[owner][0] and "differs from the manifest" in found[owner][0]
    clean = StreamingDataset.open(str(prepared_sets(DATA)))
    assert clean.verify_checksums(rank=0, world=1) == []


@pytest.mark.slow
def test_a_flipped_bit_in_a_shard_is_refused_before_anything_is_written(
    flipped: tuple[Path, Path], tmp_path: Path
) -> None:
    data, shard = flipped
    run_dir = tmp_path / "run"
    proc = train(data, run_dir)
    assert proc.returncode == EXIT_PERMANENT, proc.stderr[-3000:]
    [line] = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert "refusing to train on it" in line and shard.name in line and "sha256" in line
    assert not run_dir.exists()
