"""decode_linear: F.linear's bits at every shape and layout, the faster product only where it is the same."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import prompts, tiny_llama, tiny_qwen2

from lightning_hybrid import decode_linear
from lightning_hybrid.decode_linear import TORCH_LINEAR, linear


@pytest.fixture(autouse=True)
def fresh_choices(monkeypatch):
    monkeypatch.setattr(decode_linear, "_weight_left", {})


def strided_rows(rows: int, features: int, step: int) -> torch.Tensor:
    """(rows, 1, features) taken from a longer sequence, as ``logits_to_keep=1`` hands the lm_head."""
    return torch.randn(rows, step, features)[:, -1:]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 2, 8, 16, 24, 48, 64, 65, 200])
def test_same_bits_as_torch_linear(rows, bias, monkeypatch):
    """Whatever layout a shape ends up in, the result is F.linear's, bit for bit (contiguous and strided inputs).

    With no speed-up asked for, every shape whose bits agree takes the weight-left product, so both paths are checked.
    """
    monkeypatch.setattr(decode_linear, "MIN_SPEEDUP", 0.0)
    torch.manual_seed(rows)
    for out_features, in_features in [(1536, 576), (576, 1536), (4096, 256), (64, 64)]:
        weight = torch.randn(out_features, in_features)
        b = torch.randn(out_features) if bias else None
        inputs = torch.randn(rows, 1, in_features), strided_rows(rows, in_features, 5), torch.randn(rows, in_features)
        for x in inputs:
            with torch.no_grad():
                first, again = linear(x, weight, b), linear(x, weight, b)  # the trial, then the kept choice
            want = TORCH_LINEAR(x, weight, b)
            assert first.shape == want.shape and first.is_contiguous()
            assert torch.equal(first, want) and torch.equal(again, want), (rows, out_features, in_features, x.stride())


def test_decoding_sized_products_are_tried_and_others_are_not():
    weight = torch.randn(1536, 576)
    with torch.no_grad():
        linear(torch.randn(16, 1, 576), weight)
        linear(torch.randn(4, 47, 576), weight)  # a prefill: 188 rows
        linear(torch.randn(1, 1, 576), weight)  # one row: nothing to split
        linear(strided_rows(16, 576, 5), weight)  # a prefill's last positions: another BLAS path, not tried
    (key,) = decode_linear._weight_left
    assert key[0] == 16


def test_the_callers_rng_stream_is_untouched():
    """Generation samples from the global stream: trying both layouts must not draw from it."""
    torch.manual_seed(3)
    before = torch.get_rng_state()
    with torch.no_grad():
        linear(torch.ones(16, 1, 576), torch.ones(1536, 576))
    assert torch.equal(torch.get_rng_state(), before)


def test_steps_aside_under_autograd_and_for_other_inputs():
    """Training never sees it: with gradients recorded, and for integer, mixed-dtype or meta inputs, it is F.linear."""
    weight = torch.randn(64, 32, requires_grad=True)
    x = torch.randn(16, 32, requires_grad=True)
    linear(x, weight).sum().backward()
    want_w, want_x = weight.grad.clone(), x.grad.clone()
    weight.grad = x.grad = None
    TORCH_LINEAR(x, weight).sum().backward()
    assert torch.equal(weight.grad, want_w) and torch.equal(x.grad, want_x)
    assert not decode_linear._weight_left
    with torch.no_grad(), pytest.raises(RuntimeError):  # F.linear's own error for mixed dtypes
        linear(torch.randn(16, 32, dtype=torch.float64), torch.randn(64, 32))
    with torch.no_grad():
        assert linear(torch.randn(16, 32, device="meta"), torch.randn(64, 32, device="meta")).shape == (16, 64)
    assert not decode_linear._weight_left


def test_a_layout_that_changes_the_bits_is_refused(monkeypatch):
    """Where the weight-left product does not give F.linear's bits, F.linear is kept, however fast the other."""
    monkeypatch.setattr(decode_linear, "_product", lambda x, w, b: TORCH_LINEAR(x, w, b) + 1e-3)
    x, weight = torch.randn(16, 1, 64), torch.randn(64, 64)
    with torch.no_grad():
        out = linear(x, weight)
    assert list(decode_linear._weight_left.values()) == [False]
    assert torch.equal(out, TORCH_LINEAR(x, weight))


def test_context_installs_and_restores_and_leaves_other_replacements_alone(monkeypatch):
    assert F.linear is TORCH_LINEAR
    with pytest.raises(KeyboardInterrupt), decode_linear.decode_linear():
        assert F.linear is linear
        raise KeyboardInterrupt
    assert F.linear is TORCH_LINEAR

    def users_linear(*args):
        return TORCH_LINEAR(*args)

    monkeypatch.setattr(F, "linear", users_linear)
    with decode_linear.decode_linear():
        assert F.linear is users_linear
    assert F.linear is users_linear


@pytest.mark.parametrize(
    "make", [tiny_llama, lambda: tiny_qwen2(num_key_value_heads=2)], ids=["llama", "qwen2 (biased q/k/v)"]
)
def test_generation_gives_the_same_tokens_and_logits(make, monkeypatch):
    """A whole sampled generate of 16 rows, the weight-left product forced wherever its bits agree: same tokens,
    same logits at every step, as with F.linear."""
    monkeypatch.setattr(decode_linear, "MIN_SPEEDUP", 0.0)
    model = make()
    ids, mask = prompts(batch=16, length=7)
    settings = dict(attention_mask=mask, max_new_tokens=8, do_sample=True, output_logits=True)
    settings |= dict(return_dict_in_generate=True, pad_token_id=0)
    with torch.no_grad():
        torch.manual_seed(5)
        want = model.generate(ids, **settings)
        with decode_linear.decode_linear():
            torch.manual_seed(5)
            got = model.generate(ids, **settings)
    assert torch.equal(got.sequences, want.sequences)
    assert all(torch.equal(a, b) for a, b in zip(got.logits, want.logits))
    if not any(decode_linear._weight_left.values()):
        pytest.skip("this BLAS gave other bits for every shape here, so only F.linear ran")
