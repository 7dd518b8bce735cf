"""In-place ReLU6 / hardtanh differentiated from its output: PyTorch's outputs and gradients bit
for bit, one activation-sized copy fewer kept for the backward pass, and PyTorch's own path
wherever the call is not a recorded in-place activation."""

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from transformers import TrainingArguments

from visiontune.models import hardtanh
from visiontune.models.hardtanh import InplaceHardtanh, inplace_hardtanh

CALLS = {
    "nn.ReLU6(inplace=True)": lambda x: torch.nn.ReLU6(inplace=True)(x),
    "F.relu6(inplace=True)": lambda x: F.relu6(x, inplace=True),
    "F.hardtanh(x, lo, hi, True)": lambda x: F.hardtanh(x, -0.5, 2.0, True),
    "F.hardtanh(x, inplace=True)": lambda x: F.hardtanh(x, inplace=True),
    "F.hardtanh(keywords)": lambda x: F.hardtanh(input=x, min_val=0.25, max_val=0.75, inplace=True),
}


def _run(call, dtype, routed_on: bool):
    """Output and input gradient of ``call`` on a computed tensor that holds every case:
    below, at and above both bounds of every call, NaN and infinities."""
    values = torch.tensor([-7.0, -1.0, -0.5, 0.0, 0.25, 0.5, 0.75, 1.0, 2.0, 5.9, 6.0, 6.5,
                           float("nan"), float("inf"), -float("inf")], dtype=torch.float64)
    leaf = torch.cat([values, torch.linspace(-8, 8, 97, dtype=torch.float64)]).to(dtype).requires_grad_()
    grad_out = torch.linspace(-3, 3, leaf.numel(), dtype=torch.float64).to(dtype)
    with inplace_hardtanh(routed_on) as mode:
        out = call(leaf * 1)
    out.backward(grad_out)
    return out.detach(), leaf.grad, mode.routed if mode else 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("name", CALLS)
def test_outputs_and_gradients_are_pytorchs_bit_for_bit(name, dtype):
    plain_out, plain_grad, plain_routed = _run(CALLS[name], dtype, False)
    out, grad, routed = _run(CALLS[name], dtype, True)
    assert (plain_routed, routed) == (0, 1)
    torch.testing.assert_close(out, plain_out, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(grad, plain_grad, rtol=0, atol=0)
    assert (grad != 0).any() and (grad == 0).any()   # both sides of the mask are exercised


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU6(inplace=True),
        torch.nn.Conv2d(8, 16, 3), torch.nn.BatchNorm2d(16), torch.nn.ReLU6(inplace=True),
        torch.nn.Flatten(), torch.nn.LazyLinear(2)).train()


def _saved_bytes_and_graph(routed_on: bool):
    """Bytes of the distinct tensors autograd keeps for the backward pass, the names of the
    graph's nodes, and the gradients."""
    net, pixels = _net(), torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    net(pixels)  # materialise the lazy layer
    saved = {}

    def pack(tensor):
        saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), inplace_hardtanh(routed_on):
        loss = net(pixels).square().sum()
    nodes, stack = set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and type(node).__name__ not in nodes:
            nodes.add(type(node).__name__)
            stack.extend(next_node for next_node, _ in node.next_functions)
    loss.backward()
    return sum(saved.values()), nodes, [p.grad for p in net.parameters()]


def test_it_keeps_one_activation_copy_fewer_for_the_backward_pass():
    plain_bytes, plain_nodes, plain_grads = _saved_bytes_and_graph(False)
    own_bytes, own_nodes, own_grads = _saved_bytes_and_graph(True)
    assert "HardtanhBackward0" in plain_nodes and "HardtanhBackward0" not in own_nodes
    assert "_InplaceHardtanhBackward" in own_nodes
    # the two activations' copies: 2 x 8 x 10 x 10 and 2 x 16 x 8 x 8 float32
    assert plain_bytes - own_bytes == (2 * 8 * 10 * 10 + 2 * 16 * 8 * 8) * 4
    assert all(torch.equal(a, b) for a, b in zip(plain_grads, own_grads))


def _routed(call, grad: bool = True):
    with torch.set_grad_enabled(grad), InplaceHardtanh() as mode:
        call()
    return mode.routed


def test_other_calls_run_as_pytorch_runs_them():
    leaf = torch.randn(4, 3, requires_grad=True)
    assert _routed(lambda: F.relu6(leaf * 1)) == 0                        # out of place
    assert _routed(lambda: F.hardtanh(leaf * 1, 0.0, 1.0)) == 0
    assert _routed(lambda: F.relu6(leaf * 1, inplace=True), grad=False) == 0   # inference
    assert _routed(lambda: F.relu6(leaf.detach().clone(), inplace=True)) == 0  # no gradient
    assert _routed(lambda: F.relu6((leaf * 1)[:, :2], inplace=True)) == 0     # a view
    assert _routed(lambda: F.relu(leaf * 1, inplace=True)) == 0               # relu_ saves its output already
    with pytest.raises(RuntimeError, match="leaf Variable"):                 # PyTorch's own error
        _routed(lambda: F.relu6(leaf, inplace=True))


def test_modifying_the_saved_output_in_place_is_autograds_error_not_a_wrong_gradient():
    leaf = torch.randn(5, requires_grad=True)
    with inplace_hardtanh():
        out = F.relu6(leaf * 1, inplace=True)
    out.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


class _Images(torch.utils.data.Dataset):
    def __init__(self):
        generator = torch.Generator().manual_seed(0)
        self.pixels = torch.randn(12, 3, 32, 32, generator=generator)
        self.labels = torch.randint(0, 3, (12,), generator=generator)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return {"pixel_values": self.pixels[index], "labels": self.labels[index]}


def _relu6_efficientnet():
    """A tiny timm EfficientNet with in-place ReLU6 activations, as EfficientNet-Lite has."""
    import timm
    from transformers import TimmWrapperForImageClassification

    from visiontune.models.builtin import timm_wrapper_config

    config = timm_wrapper_config("test_efficientnet", ["a", "b", "c"], {
        "architecture": "test_efficientnet", "input_size": (3, 32, 32), "classifier": "classifier"})
    config.model_args = {"act_layer": "relu6"}
    torch.manual_seed(0)
    model = TimmWrapperForImageClassification(config)
    model.timm_model.load_state_dict(
        timm.create_model("test_efficientnet", num_classes=3, act_layer="relu6").state_dict())
    assert sum(isinstance(m, torch.nn.ReLU6) and m.inplace for m in model.modules()) >= 10
    return model


def _train(tmp_path, monkeypatch, switch: str):
    """The trained weights, and the routed count of each time the mode was entered."""
    from visiontune.training.trainer import VisionTrainer

    monkeypatch.setenv(hardtanh.ENV_SWITCH, switch)
    routed = []
    monkeypatch.setattr(InplaceHardtanh, "__exit__", lambda self, *exc: routed.append(self.routed)
                        or TorchFunctionMode.__exit__(self, *exc))
    args = TrainingArguments(output_dir=str(tmp_path / switch), use_cpu=True, report_to=[], seed=3,
                             max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                             save_strategy="no", disable_tqdm=True)
    trainer = VisionTrainer(model=_relu6_efficientnet(), args=args, train_dataset=_Images())
    trainer.train()
    return trainer.model.state_dict(), routed


def test_the_trainer_trains_with_it_to_the_same_weights(tmp_path, monkeypatch):
    """Three float32 training steps of a ReLU6 EfficientNet through the VisionTrainer: the
    activations are routed in every training forward pass, and the weights come out bit for
    bit as with the switch off."""
    plain, plain_routed = _train(tmp_path, monkeypatch, "0")
    own, routed = _train(tmp_path, monkeypatch, "1")
    assert plain_routed == [] and len(routed) == 3 and min(routed) >= 10
    assert plain.keys() == own.keys()
    for name, value in plain.items():
        assert torch.equal(own[name], value), name
