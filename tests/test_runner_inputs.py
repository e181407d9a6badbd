
from rapidserve.kv.block_manager import BlockManager
from rapidserve.request import Request
from rapidserve.runner.graphs import decode_batch_sizes, decode_num_splits, pick, token_buckets
from rapidserve.runner.inputs import StepInputs
from rapidserve.sampling_params import SamplingParams
from rapidserve.scheduler.chunked import ScheduledRequest


def _sched(bm: BlockManager, rid: str, tokens: list[int], start: int, n: int) -> ScheduledRequest:
    r = Request(rid, tokens, SamplingParams(), 4)
    bm.allocate(rid, start + n)
    return ScheduledRequest(r, start, n, start + n == len(tokens))


def test_step_inputs_layout():
    bm = BlockManager(16, 4)
    a = _sched(bm, "a", list(range(10, 20)), 0, 6)  # a prefill chunk, no sampling
    b = _sched(bm, "b", list(range(30, 39)), 8, 1)  # a decode of position 8
    inp = StepInputs([a, b], bm)
    assert inp.input_ids.tolist() == [10, 11, 12, 13, 14, 15, 38]
    assert inp.positions.tolist() == [0, 1, 2, 3, 4, 5, 8]
    assert inp.query_start_loc.tolist() == [0, 6, 7]
    assert inp.seq_lens.tolist() == [6, 9]
    ta, tb = bm.block_table("a"), bm.block_table("b")
    expect = [ta[p // 4] * 4 + p % 4 for p in range(6)] + [tb[2] * 4 + 0]
    assert inp.slot_mapping.tolist() == expect
    assert inp.logits_indices.tolist() == [6]
    assert inp.max_query_len == 6 and inp.max_seq_len == 9
    assert inp.num_decodes == 0  # a prefill chunk comes first
    assert StepInputs([b, a], bm).num_decodes == 1
    assert StepInputs([b], bm).num_decodes == 1


def test_step_inputs_padding_for_graphs():
    bm = BlockManager(16, 4)
    a = _sched(bm, "a", [1, 2, 3], 2, 1)
    inp = StepInputs([a], bm, pad_seqs=4, pad_tokens=4, table_width=8)
    assert inp.slot_mapping.tolist()[1:] == [-1, -1, -1]
    assert inp.seq_lens.tolist() == [3, 0, 0, 0]
    assert inp.block_tables.shape == (4, 8)
    assert inp.query_start_loc.tolist() == [0, 1, 1, 1, 1]
    assert inp.input_ids.tolist() == [3, 0, 0, 0]


def test_graph_sizes():
    assert decode_batch_sizes(256)[:5] == [1, 2, 4, 8, 16] and decode_batch_sizes(256)[-1] == 256
    assert decode_batch_sizes(12) == [1, 2, 4, 8, 12]
    assert decode_batch_sizes(1) == [1]
    assert token_buckets(2048)[:4] == [16, 32, 64, 128] and token_buckets(2048)[-1] == 2048
    assert token_buckets(600)[-1] == 600
    assert pick([1, 2, 4, 8], 3) == 4 and pick([1, 2], 3) is None
    assert decode_num_splits(1, 8, 132) == 32
    assert decode_num_splits(256, 8, 132) == 1
    assert 1 <= decode_num_splits(8, 8, 132) <= 32
