import pytest

from rapidserve.kv.block_manager import BlockManager, blocks_needed


def test_blocks_needed():
    assert blocks_needed(0, 16) == 0
    assert blocks_needed(1, 16) == 1
    assert blocks_needed(16, 16) == 1
    assert blocks_needed(17, 16) == 2


def test_allocate_grows_and_frees():
    bm = BlockManager(num_blocks=4, block_size=4)
    assert bm.allocate("a", 5)
    assert len(bm.block_table("a")) == 2 and bm.num_free_blocks == 2
    assert bm.allocate("a", 8)  # still 2 blocks
    assert len(bm.block_table("a")) == 2
    assert bm.allocate("a", 9)
    assert len(bm.block_table("a")) == 3 and bm.num_free_blocks == 1
    assert bm.usage == pytest.approx(0.75)
    bm.free("a")
    assert bm.num_free_blocks == 4 and not bm.has("a")
    bm.free("a")  # freeing twice is a no-op
    assert bm.num_free_blocks == 4


def test_allocate_is_all_or_nothing():
    bm = BlockManager(num_blocks=3, block_size=2)
    assert bm.allocate("a", 4)
    before = bm.block_table("b")
    assert not bm.allocate("b", 4)  # needs 2, one free
    assert bm.block_table("b") == before == [] and bm.num_free_blocks == 1
    assert bm.num_new_blocks("b", 4) == 2


def test_tables_are_disjoint():
    bm = BlockManager(num_blocks=8, block_size=2)
    for rid in "abcd":
        assert bm.allocate(rid, 4)
    all_blocks = [b for rid in "abcd" for b in bm.block_table(rid)]
    assert sorted(all_blocks) == list(range(8))


def test_shared_blocks_are_reference_counted():
    bm = BlockManager(num_blocks=6, block_size=2)
    assert bm.allocate("a", 6)
    bm.share("a", "b", 2)
    shared = bm.block_table("a")[:2]
    assert bm.block_table("b") == shared
    assert all(bm.ref_count(b) == 2 for b in shared)
    assert bm.allocate("b", 6)  # b grows with a block of its own
    assert bm.block_table("b")[2] not in bm.block_table("a")
    bm.free("a")
    # the shared blocks stay with b
    assert all(bm.ref_count(b) == 1 for b in shared)
    assert bm.num_free_blocks == 6 - 3
    bm.free("b")
    assert bm.num_free_blocks == 6


def test_bad_arguments():
    with pytest.raises(ValueError, match="at least one block"):
        BlockManager(0, 16)
    bm = BlockManager(4, 4)
    bm.allocate("a", 4)
    with pytest.raises(ValueError, match="only 1 blocks"):
        bm.share("a", "b", 2)
