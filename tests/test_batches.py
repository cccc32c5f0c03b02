"""BatchFields: which mini-batch entries become record fields, and clear refusals."""

import pytest
import torch

from avalanche_distributed_rehearsal.integration.batches import BatchFields


def test_sequence_defaults_and_merge():
    x, y, t = torch.randn(4, 3), torch.arange(4), torch.zeros(4, dtype=torch.int64)
    fields = BatchFields()
    assert fields.mapping([x, y, t]) == {"input": 0, "label": 1, "task": 2}
    assert fields.mapping([x, y, torch.randn(4)]) == {"input": 0, "label": 1}  # not task labels
    merged = fields.merge([x, y, t, "extra"], {"input": torch.ones(2, 3), "label": torch.tensor([7, 8]),
                                              "task": torch.tensor([1, 1])})
    assert merged[0].shape == (6, 3) and merged[1].tolist() == [0, 1, 2, 3, 7, 8]
    assert merged[3] == "extra"


def test_dictionary_defaults_rename_labels_and_skip_non_tensors():
    batch = {"pixels": torch.randn(4, 3), "targets": torch.arange(4), "t": torch.zeros(4),
             "scalar": torch.tensor(1.0), "note": "text"}
    assert BatchFields().mapping(batch) == {"pixels": "pixels", "label": "targets", "task": "t"}


@pytest.mark.parametrize("batch, fields, match", [
    ({"note": "text", "scalar": torch.tensor(1.0)}, None, "at least one tensor entry"),
    ({"pixels": torch.randn(4, 3)}, {"input": "pixels", "label": "labels"}, "no entry 'labels'"),
    ([torch.randn(4, 3), torch.arange(4)], {"input": 0, "label": 1, "task": 2}, "no entry 2"),
    ([torch.randn(4, 3)], None, "sequences"),
])
def test_ill_formed_batches_are_refused_by_name(batch, fields, match):
    with pytest.raises(ValueError, match=match):
        BatchFields(fields).to_record(batch)


@pytest.mark.parametrize("fields", [{}, {"input": 1.5}, {"": 0}, {"input": True}, [("input", 0)]])
def test_bad_fields_argument(fields):
    with pytest.raises(TypeError, match="fields"):
        BatchFields(fields)
