"""Integer storage refuses values its cast would change (core only, no Avalanche)."""

import pytest
import torch

from avalanche_distributed_rehearsal.core import RecordLayout, ShardedRehearsalBuffer
from avalanche_distributed_rehearsal.core.validation import check_storable


@pytest.mark.parametrize("values", [
    [[0.5, 1.0]],           # normalised pixels
    [[256.0, 0.0]],         # above uint8
    [[-1.0, 3.0]],          # below uint8
    [[float("inf"), 0.3]],  # a non-integer beside an Inf: the Inf is nonfinite's business
])
def test_float_values_that_uint8_cannot_hold_are_refused(values):
    record = {"input": torch.tensor(values), "label": torch.tensor([0])}
    with pytest.raises(ValueError, match=r"'input' is stored as uint8 \(dtypes\['input'\]\)"):
        check_storable(record, None, {"input": torch.uint8})


def test_what_the_cast_keeps_passes_and_costs_nothing_without_a_cast():
    check_storable({"input": torch.tensor([[0.0, 255.0, 17.0]])}, None, {"input": torch.uint8})
    check_storable({"input": torch.tensor([[float("nan"), 3.0]])}, None, {"input": torch.uint8})
    check_storable({"input": torch.tensor([[0.5]])}, None, None)  # stored as given
    check_storable({"input": torch.tensor([[0.5]])}, None, {"input": torch.float16})
    check_storable({"label": torch.tensor([3])}, None, {"input": torch.uint8})
    layout = RecordLayout([("input", (1,), torch.uint8)])
    with pytest.raises(ValueError, match="like the samples already stored"):
        check_storable({"input": torch.tensor([[0.5]])}, layout, None)
    with pytest.raises(ValueError, match=r"int16 values that are not integers in \[0, 255\]"):
        check_storable({"input": torch.tensor([[300]], dtype=torch.int16)}, layout, None)
    check_storable({"input": torch.tensor([[200]], dtype=torch.int16)}, layout, None)


def test_the_buffer_refuses_before_storing_and_accepts_integer_floats_at_every_step():
    buf = ShardedRehearsalBuffer(10, dtypes={"input": torch.uint8})
    with pytest.raises(ValueError, match="not integers in"):
        buf.insert(torch.rand(3, 4), torch.tensor([0, 1, 1]))
    assert len(buf) == 0 and buf.layout is None
    x = torch.tensor([[0.0, 255.0], [3.0, 4.0]])
    buf.insert(x, torch.tensor([0, 1]))
    buf.insert(x[1:] - 2, torch.tensor([0]))  # a second float batch into uint8 storage
    stored = buf.local_tensors()["input"]
    assert stored.dtype == torch.uint8 and stored.tolist() == [[0, 255], [3, 4], [1, 2]]
    before = buf.state_dict()
    with pytest.raises(ValueError, match="e.g. 0.5"):
        buf.insert(torch.tensor([[0.5, 1.0]]), torch.tensor([1]))
    assert torch.equal(buf.state_dict()["rows"], before["rows"])
    buf.close()
