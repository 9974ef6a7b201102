"""Multi-rank tests of hpcllm.data: parallel prepare against a single rank, concurrent readers."""

import os

import h5py
import numpy as np
import pytest

from hpcllm.data.loader import Loader
from hpcllm.data.prepare import prepare
from hpcllm.data.shards import DataError, open_shards, write_shard


def write_corpus(root):
    """Ten documents of different lengths, so the size-balanced split gives each rank some."""
    for i in range(10):
        path = root / f"dir{i % 3}" / f"doc{i}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            f"document {i}: " + "naïve text ✓ " * (20 + 37 * i) + "\n", encoding="utf-8"
        )


def read_stream(data_dir, split):
    with open_shards(data_dir, split) as shards:
        paths = shards.paths
    stream = []
    for path in paths:
        with h5py.File(path, "r", locking=False) as f:
            stream += f["tokens"][:].tolist()
    return stream


@pytest.mark.mpi(ranks=2, timeout=120)
@pytest.mark.parametrize("tokenizer", ["byte", "bpe"])
def test_prepare_two_ranks_matches_one_rank(comm, mpi_tmp_path, tokenizer):
    if comm.rank == 0:
        write_corpus(mpi_tmp_path / "corpus")
    comm.barrier()
    kwargs = {"tokenizer": tokenizer, "vocab_size": 300, "val_fraction": 0.1, "shard_tokens": 1500}
    summary = prepare(
        [str(mpi_tmp_path / "corpus")], str(mpi_tmp_path / "two"), comm=comm, **kwargs
    )
    assert summary["ranks"] == 2 and summary["files"] == 10
    # Both ranks wrote shards, and the summary lists all of them on every rank.
    assert {name.split("-")[1] for name in summary["shards"]} == {"0000", "0001"}
    assert sorted(os.listdir(mpi_tmp_path / "two")) == sorted(
        summary["shards"] + (["tokenizer.json"] if tokenizer == "bpe" else [])
    )

    if comm.rank == 0:
        single = prepare([str(mpi_tmp_path / "corpus")], str(mpi_tmp_path / "one"), **kwargs)
        for key in ("files", "train_tokens", "val_tokens", "vocab_size", "eot_id"):
            assert summary[key] == single[key], key
        # Shards in name order replay the single-rank token stream exactly.
        for split in ("train", "val"):
            assert read_stream(mpi_tmp_path / "two", split) == read_stream(
                mpi_tmp_path / "one", split
            )


@pytest.mark.mpi(ranks=2, timeout=60)
def test_prepare_error_fails_every_rank(comm, mpi_tmp_path):
    # The input check runs on rank 0 only; rank 1 must raise too instead of waiting forever.
    with pytest.raises(DataError, match=r"no-such-input does not exist"):
        prepare([str(mpi_tmp_path / "no-such-input")], str(mpi_tmp_path / "out"), comm=comm)


@pytest.mark.mpi(ranks=2, timeout=120)
def test_ranks_read_their_own_samples(comm, mpi_tmp_path):
    seq_len, sizes = 16, [16 * 30 + 1, 16 * 25 + 3]
    if comm.rank == 0:
        # Token values 0, 1, 2, ... across shards: a sample's first token identifies it.
        for i, (start, n) in enumerate(zip(np.cumsum([0, *sizes]), sizes, strict=False)):
            write_shard(
                mpi_tmp_path / f"train-{i:04d}.h5",
                np.arange(start, start + n),
                vocab_size=100_000,
                tokenizer="bpe",
                eot_id=99_999,
            )
    comm.barrier()

    with open_shards(mpi_tmp_path, "train") as shards:  # both ranks hold the same files open
        index_of = {
            int(shards.read_sample(i, seq_len)[0]): i for i in range(shards.num_samples(seq_len))
        }
        loader = Loader(
            shards,
            seq_len=seq_len,
            micro_batch_size=2,
            grad_accum_steps=2,
            dp_rank=comm.rank,
            dp_size=comm.size,
            seed=5,
        )
        mine = [
            [index_of[int(t)] for x, _ in loader.next_step() for t in x[:, 0]] for _ in range(4)
        ]
        everyone = comm.gather(mine, root=0)
        if comm.rank == 0:
            reference = Loader(
                shards,
                seq_len=seq_len,
                micro_batch_size=2,
                grad_accum_steps=4,
                dp_rank=0,
                dp_size=1,
                seed=5,
            )
            for step, (rank0, rank1) in enumerate(zip(*everyone, strict=True)):
                expected = [index_of[int(t)] for x, _ in reference.next_step() for t in x[:, 0]]
                assert len(rank0) == len(rank1) == 4 and not set(rank0) & set(rank1), step
                assert sorted(rank0 + rank1) == sorted(expected), step
