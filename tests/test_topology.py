"""The rank grid: pure arithmetic for world sizes up to 1024, MPI communicators on 4 ranks,
and the --dry-run layout printer (hpcllm.train's main, in process)."""

import pytest

from hpcllm.distributed.topology import (
    AXES,
    LayoutError,
    coords_of,
    describe,
    group_ranks,
    node_layout,
    rank_of,
    resolve_dims,
)

from helpers import refusal

WORLD_SIZES = [1, 2, 4, 6, 12, 16, 64, 1024]


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def factorisations(world: int):
    """Every (pp, dp, tp) with pp * dp * tp == world."""
    for pp in divisors(world):
        for tp in divisors(world // pp):
            yield pp, world // (pp * tp), tp


def test_factorisations_cover_the_expected_counts():
    # Guards the test's own enumeration: 1024 = 2^10 has C(12, 2) = 66 ordered triples.
    counts = {world: sum(1 for _ in factorisations(world)) for world in WORLD_SIZES}
    assert counts == {1: 1, 2: 3, 4: 6, 6: 9, 12: 18, 16: 15, 64: 28, 1024: 66}


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_group_arithmetic_for_every_layout(world):
    for pp, dp, tp in factorisations(world):
        dims = resolve_dims(world, dp=dp, pp=pp, tp=tp)
        assert dims == {"pp": pp, "dp": dp, "tp": tp}
        coords = [coords_of(r, dims) for r in range(world)]

        # coords_of and rank_of are inverse, and coordinates stay in range.
        for r, c in enumerate(coords):
            assert rank_of(c, dims) == r
            assert all(0 <= c[a] < dims[a] for a in AXES)
        assert len({tuple(c.values()) for c in coords}) == world

        for axis in AXES:
            groups = group_ranks(axis, dims)
            # The groups partition the ranks into world / size groups of the axis size.
            assert len(groups) == world // dims[axis], (dims, axis)
            assert all(len(g) == dims[axis] for g in groups), (dims, axis)
            assert sorted(r for g in groups for r in g) == list(range(world)), (dims, axis)
            for g in groups:
                # Members differ only in this axis's coordinate, which runs 0..size-1 in order.
                others = {tuple(coords[r][a] for a in AXES if a != axis) for r in g}
                assert len(others) == 1, (dims, axis, g)
                assert [coords[r][axis] for r in g] == list(range(dims[axis])), (dims, axis, g)

        # Tensor-parallel neighbours are adjacent ranks (usually one node).
        for g in group_ranks("tp", dims):
            assert g == list(range(g[0], g[0] + tp)) and g[0] % tp == 0, (dims, g)


def test_docstring_example_16_ranks():
    dims = resolve_dims(16, dp=4, pp=2, tp=2)
    assert group_ranks("tp", dims) == [[2 * i, 2 * i + 1] for i in range(8)]
    assert group_ranks("dp", dims) == [[0, 2, 4, 6], [1, 3, 5, 7], [8, 10, 12, 14], [9, 11, 13, 15]]
    assert group_ranks("pp", dims) == [[i, i + 8] for i in range(8)]
    assert coords_of(13, dims) == {"pp": 1, "dp": 2, "tp": 1}
    assert rank_of({"pp": 1, "dp": 2, "tp": 1}, dims) == 13


@pytest.mark.parametrize(
    "world,pp,tp,dp", [(1024, 4, 1, 256), (12, 3, 2, 2), (6, 1, 1, 6), (64, 64, 1, 1)]
)
def test_dp_zero_takes_the_rest(world, pp, tp, dp):
    assert resolve_dims(world, pp=pp, tp=tp) == {"pp": pp, "dp": dp, "tp": tp}
    assert resolve_dims(world, dp=0, pp=pp, tp=tp)["dp"] == dp


@pytest.mark.parametrize(
    "world,dp,pp,tp", [(16, 3, 2, 2), (1024, 2, 4, 1), (12, 12, 2, 1), (6, 1, 1, 1)]
)
def test_product_mismatch_names_every_factor_and_the_world(world, dp, pp, tp):
    with pytest.raises(LayoutError) as e:
        resolve_dims(world, dp=dp, pp=pp, tp=tp)
    msg = str(e.value)
    for text in (f"pp={pp}", f"dp={dp}", f"tp={tp}", str(pp * dp * tp), str(world)):
        assert text in msg, (text, msg)


def test_auto_dp_that_does_not_divide_names_the_factors():
    with pytest.raises(LayoutError) as e:
        resolve_dims(12, pp=5, tp=1)
    assert all(text in str(e.value) for text in ("12", "pp=5", "tp=1")), str(e.value)


def test_describe_first_line_and_truncation():
    text = describe(resolve_dims(1024, pp=4))
    lines = text.splitlines()
    assert lines[0] == "world 1024 = pp 4 x dp 256 x tp 1"
    assert lines[1].startswith("  pp groups (size 4): [0,256,512,768] [1,257,513,769]")
    assert lines[1].endswith("... (256 groups)")
    assert lines[3].endswith("... (1024 groups)")


def test_node_layout_even_degenerate_and_uneven():
    even = node_layout([7, 7, 9, 9, 4, 4])  # any node ids, ranks of a node need not be adjacent
    assert (even.num_nodes, even.local_size, even.reason) == (3, 2, None)
    assert node_layout([0, 1, 0, 1]).reason is None
    assert "one node" in (node_layout([3, 3, 3]).reason or "")
    assert "one rank of the group per node (3 nodes)" == node_layout([0, 1, 2]).reason
    uneven = node_layout([0, 1, 1, 1]).reason or ""
    assert uneven.startswith("uneven nodes") and "1 on the node of rank 0" in uneven, uneven
    assert "3 on the node of rank 1" in uneven, uneven


# ------------------------------------------------------------------ MPI communicators


@pytest.mark.mpi(ranks=4, timeout=120)
def test_grid_communicators_match_the_arithmetic(comm):
    from hpcllm.distributed.topology import Grid

    for pp, dp, tp in [(2, 2, 1), (1, 4, 1), (1, 2, 2), (2, 1, 2), (4, 1, 1)]:
        grid = Grid.build(comm, dp=dp, pp=pp, tp=tp)
        dims = grid.dims
        assert dims == {"pp": pp, "dp": dp, "tp": tp}
        assert grid.coords == coords_of(comm.rank, dims)
        for axis in AXES:
            sub = grid.comm(axis)
            assert sub.Get_size() == dims[axis] == grid.size(axis)
            assert sub.Get_rank() == grid.rank(axis) == grid.coords[axis]
            # The world ranks of this rank's group, in the sub-communicator's rank order.
            members = sub.allgather(comm.rank)
            mine = [g for g in group_ranks(axis, dims) if comm.rank in g]
            assert len(mine) == 1 and members == mine[0], (dims, axis, members)

        # pp_prev / pp_next are ranks in the pp communicator: pass world ranks down the pipeline.
        assert (grid.pp_prev is None) == grid.is_first_stage == (grid.coords["pp"] == 0)
        assert (grid.pp_next is None) == grid.is_last_stage == (grid.coords["pp"] == pp - 1)
        pp_comm = grid.comm("pp")
        if grid.pp_next is not None:
            pp_comm.send(comm.rank, dest=grid.pp_next, tag=7)
        if grid.pp_prev is not None:
            got = pp_comm.recv(source=grid.pp_prev, tag=7)
            assert got == rank_of({**grid.coords, "pp": grid.coords["pp"] - 1}, dims)
        grid.free()


# ------------------------------------------------------------------ --dry-run


def test_dry_run_prints_a_1024_rank_layout_without_mpirun(capsys):
    from hpcllm import train

    args = ["--world-size", "1024", "--parallel.pp", "4", "--model.vocab_size", "257"]
    assert train.main(["--dry-run", *args]) == 0  # in process: the CLI contract is test_train's
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "world 1024 = pp 4 x dp 256 x tp 1", out
    assert "pp groups (size 4): [0,256,512,768]" in out


def test_dry_run_layout_that_does_not_divide_is_refused():
    message = refusal(
        {}, base={}, extra_args=["--dry-run", "--world-size", "1024", "--parallel.pp", "3"]
    )
    for text in ("1024", "pp=3", "tp=1"):
        assert text in message, (text, message)
    args = ["--dry-run", "--world-size", "16", "--parallel.pp", "2", "--parallel.dp", "3"]
    message = refusal({}, base={}, extra_args=args)
    for text in ("16", "pp=2", "dp=3", "tp=1", "6 ranks"):
        assert text in message, (text, message)


def test_describe_keeps_lines_short_at_any_scale():
    lines = describe({"pp": 2, "dp": 50_000, "tp": 1}).splitlines()
    assert max(map(len, lines)) < 200, max(map(len, lines))
    assert "dp groups (size 50000): [0,1,2,3,4,5,6,7,...,49998,49999]" in lines[2]
    assert "[0,1,2,3]" in describe({"pp": 1, "dp": 4, "tp": 1})  # short groups in full
