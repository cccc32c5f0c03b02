import pytest
import torch

from avalanche_distributed_rehearsal.core import RecordLayout, ShardStorage


def make_layout(shape=(3, 2), dtype=torch.float32):
    return RecordLayout([("label", (), torch.int64), ("task", (), torch.int64),
                         ("input", shape, dtype)])


def test_fields_are_aligned_and_rows_round_trip():
    layout = make_layout((5,), torch.uint8)
    assert layout.row_bytes % 8 == 0
    assert all(f.offset % 8 == 0 for f in layout.fields.values())
    rows = torch.zeros((4, layout.row_bytes), dtype=torch.uint8)
    x = torch.randint(0, 255, (4, 5), dtype=torch.uint8)
    y = torch.tensor([1, 2, 3, 4])
    storage = ShardStorage(4, "cpu")
    storage.allocate(layout)
    storage.write_fields([0, 1, 2, 3], {"input": x, "label": y,
                                        "task": torch.zeros(4, dtype=torch.int64)})
    rows = storage.gather(torch.arange(4))
    out = layout.unpack(rows)
    assert torch.equal(out["input"], x) and torch.equal(out["label"], y)


def test_field_view_is_zero_copy():
    layout = make_layout()
    rows = torch.zeros((2, layout.row_bytes), dtype=torch.uint8)
    layout.field_view(rows, "input")[1, 2, 1] = 7.5
    assert layout.unpack(rows)["input"][1, 2, 1] == 7.5
    assert layout.field_view(rows, "input").data_ptr() == rows.data_ptr() + layout.fields["input"].offset


def test_layout_description_round_trip_and_errors():
    layout = make_layout((3, 8, 8), torch.float16)
    assert RecordLayout.from_description(layout.describe()) == layout
    with pytest.raises(ValueError, match="duplicate"):
        RecordLayout([("a", (), torch.int64), ("a", (), torch.int64)])
    with pytest.raises(TypeError):
        RecordLayout([("a", (), torch.bool)])


def test_storage_is_lazily_shaped_and_preallocated():
    storage = ShardStorage(10, "cpu")
    assert not storage.allocated and storage.nbytes == 0 and storage.size == 0
    layout = make_layout()
    storage.allocate(layout)
    assert storage.rows.shape == (10, layout.row_bytes)
    assert storage.nbytes == 10 * layout.row_bytes
    with pytest.raises(ValueError, match="already laid out"):
        storage.allocate(make_layout((4,)))


def test_storage_is_not_pinned_by_default():
    storage = ShardStorage(4, "cpu")
    assert not storage.pin_memory
    storage.allocate(make_layout())
    assert not storage.rows.is_pinned()


def test_write_fields_casts_to_the_storage_dtype():
    layout = RecordLayout([("logits", (3,), torch.float16), ("x", (2,), torch.uint8)])
    storage = ShardStorage(4, "cpu")
    storage.allocate(layout)
    logits = torch.tensor([[0.1, -2.5, 3.0], [1e-3, 7.0, -0.5]], dtype=torch.float32)
    storage.write_fields([1, 0], {"logits": logits, "x": torch.tensor([[1, 2], [3, 4]])})
    fields = storage.fields()
    assert fields["logits"].dtype == torch.float16
    assert torch.equal(fields["logits"][1], logits[0].half())
    assert fields["x"].tolist() == [[3, 4], [1, 2]]
    # a finite value beyond float16's range stays finite (clamped), never inf
    storage.write_fields([2], {"logits": torch.tensor([[1e6, -1e6, 0.0]]), "x": torch.zeros(1, 2)})
    assert storage.fields()["logits"][2].tolist() == [65504.0, -65504.0, 0.0]


def test_storage_write_gather_and_resize():
    layout = make_layout((2,))
    storage = ShardStorage(5, "cpu")
    storage.allocate(layout)
    storage.write_fields([0, 1, 2], {"input": torch.arange(6.).view(3, 2),
                                     "label": torch.tensor([0, 1, 2]),
                                     "task": torch.zeros(3, dtype=torch.int64)})
    records = storage.gather(torch.arange(3))
    assert storage.size == 3
    got = layout.unpack(storage.gather(torch.tensor([2, 0])))
    assert got["label"].tolist() == [2, 0]
    storage.resize(2, keep=torch.tensor([2, 1]))
    assert storage.capacity == 2 and storage.size == 2
    assert storage.fields()["label"].tolist() == [2, 1]
    with pytest.raises(IndexError):
        storage.write(torch.tensor([5]), records[:1])


def test_step_message_round_trips_through_the_kept_buffers():
    """A step's message (every rank's metadata, then the records it serves) and the
    received records: the message built in the storage's kept buffer holds the same bytes
    as a new tensor, the buffer reused from step to step (no fresh page-faulted tensor per
    step) and rewritten each time, so one step's message never leaks into the next. The
    received records are read in place from the received message (no copy)."""
    from avalanche_distributed_rehearsal.core.draw import PreparedDraw, compose, split_message

    storage = ShardStorage(8)
    storage.allocate(make_layout((5,), torch.float32))
    row_bytes = storage.layout.row_bytes
    pointers = set()
    for step, (sends, recvs) in enumerate([([2, 1, 0], [1, 0, 3]), ([0, 3, 1], [2, 2, 0]),
                                           ([1, 1, 1], [0, 0, 1]), ([1, 0, 0], [0, 0, 0])]):
        meta = torch.arange(4, dtype=torch.int64) + 100 * step
        rows = torch.randint(0, 256, (sum(sends), row_bytes), dtype=torch.uint8)
        prepared = PreparedDraw(send=rows, send_splits=sends, recv_splits=recvs)
        kept, splits, recv_splits = compose(meta, prepared, 3, row_bytes, storage)
        fresh, splits_new, recv_new = compose(meta, prepared, 3, row_bytes)
        assert torch.equal(kept, fresh) and (splits, recv_splits) == (splits_new, recv_new)
        pointers.add(kept.data_ptr())
        # what arrives: one chunk per source rank, its metadata first, then its records
        incoming = [torch.randint(0, 256, (n, row_bytes), dtype=torch.uint8) for n in recvs]
        recv = torch.cat([torch.cat([meta.view(torch.uint8), chunk.reshape(-1)])
                          for chunk in incoming])
        metas, records = split_message(recv, recv_splits, 4, row_bytes)
        assert torch.equal(metas, meta.expand(3, 4))
        if not sum(recvs):
            assert records is None
            continue
        assert records.flat is recv and len(records) == sum(recvs)
        arrived = torch.stack([recv[o: o + row_bytes] for o in records.starts.tolist()])
        assert torch.equal(arrived, torch.cat(incoming))
    assert len(pointers) <= 2  # the message buffer, regrown once


@pytest.mark.parametrize("seed", range(4))
def test_received_fields_equal_a_gather_of_the_packed_records(seed):
    """Fields read straight out of a received message, in a random draw order, equal the
    packed records' fields gathered in that order (random layouts, an empty field, chunk
    sizes and source ranks)."""
    from avalanche_distributed_rehearsal.core.draw import split_message

    gen = torch.Generator().manual_seed(seed)
    choices = [((3, 2), torch.float32), ((), torch.int64), ((5,), torch.uint8),
               ((2, 0), torch.float32), ((7,), torch.float16), ((1,), torch.int32)]
    picked = torch.randperm(len(choices), generator=gen)[: 2 + seed % 3].tolist()
    layout = RecordLayout([(f"f{i}", *choices[i]) for i in picked])
    row_bytes, meta_words = layout.row_bytes, 3
    world = 1 + seed
    counts = torch.randint(0, 4, (world,), generator=gen).tolist()
    counts[seed % world] += 1  # at least one record arrives
    chunks = [torch.randint(0, 256, (n, row_bytes), dtype=torch.uint8, generator=gen)
              for n in counts]
    meta = torch.randint(0, 256, (meta_words * 8,), dtype=torch.uint8, generator=gen)
    recv = torch.cat([torch.cat([meta, chunk.reshape(-1)]) for chunk in chunks])
    splits = [meta_words * 8 + n * row_bytes for n in counts]
    _, received = split_message(recv, splits, meta_words, row_bytes)
    order = torch.randint(0, sum(counts), (2 * sum(counts),), generator=gen)
    got = received.fields(layout, order)
    packed = layout.unpack(torch.cat(chunks))
    assert list(got) == list(packed)
    for name, view in packed.items():
        want = view.index_select(0, order)
        assert got[name].shape == want.shape and got[name].dtype == want.dtype
        assert got[name].is_contiguous()
        assert torch.equal(got[name].reshape(-1).view(torch.uint8) if got[name].numel() else
                           got[name], want.reshape(-1).view(torch.uint8) if want.numel() else want)


@pytest.mark.parametrize("seed", range(6))
def test_write_fields_stores_each_row_at_its_slot_whatever_the_row_order(seed):
    """Row ``rows[k]`` lands at ``slots[k]`` for permuted rows, consecutive runs in any
    order (written as a slice), scattered subsets, repeated rows and large samples (copied
    row by row), against a row-by-row reference."""
    gen = torch.Generator().manual_seed(seed)
    shape = (3, 8, 8) if seed < 3 else (3, 64, 100)  # the second above the row-copy size
    layout = RecordLayout([("input", shape, torch.float32), ("label", (), torch.int64)])
    batch = 12
    values = {"input": torch.randn((batch,) + shape, generator=gen),
              "label": torch.arange(batch) * 7}
    for case in range(8):
        n = int(torch.randint(1, batch + 1, (1,), generator=gen))
        if case % 4 == 0:  # consecutive rows, shuffled
            first = int(torch.randint(0, batch - n + 1, (1,), generator=gen))
            rows = (torch.randperm(n, generator=gen) + first).tolist()
        elif case % 4 == 1:  # a repeated row among others
            rows = torch.randint(0, batch, (n,), generator=gen).tolist()
        else:
            rows = torch.randperm(batch, generator=gen)[:n].tolist()
        slots = torch.randperm(20, generator=gen)[:n].tolist()
        storage = ShardStorage(20)
        storage.allocate(layout)
        storage.write_fields(slots, values, rows=rows)
        fields = storage.fields()
        assert storage.size == max(slots) + 1
        for slot, row in zip(slots, rows):
            assert torch.equal(fields["input"][slot], values["input"][row])
            assert int(fields["label"][slot]) == row * 7
