"""``model.compile``: only a compile failure turns compile off; any other error of the forward propagates."""

import pytest
import torch

from lmrecipes.models.speed import compiled_or_eager


class OutOfMemoryAtForward(torch.nn.Module):
    """A module whose forward fails as a too-large batch would on a GPU: not a reason to stop compiling."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_an_out_of_memory_error_propagates_and_leaves_compile_on():
    torch._dynamo.reset()
    module = OutOfMemoryAtForward()
    module.compile()
    with pytest.raises(torch.OutOfMemoryError, match="out of memory"):
        compiled_or_eager(module, torch.ones(2, 4))
    assert module._compiled_call_impl is not None  # not dropped: the caller decides what to do with an OOM
    assert module.calls == 1  # no eager retry either


def test_a_compiled_module_keeps_its_state_dict_names():
    from test_speed import TINY, clm

    module = clm(compile=True, config=TINY).eval()
    names = set(module.state_dict())
    with torch.no_grad():
        module(torch.randint(0, 50, (2, 8)))
    assert module._compiled is True
    assert set(module.state_dict()) == names and not any("_orig_mod" in n for n in names)
