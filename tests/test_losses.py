"""Loss functions against GPT-2's own loss and against the HF course's key-token formula."""

import math

import pytest
import torch
from torch.nn import CrossEntropyLoss
from transformers import GPT2Config, GPT2LMHeadModel

from lmrecipes.losses import (
    IGNORE_INDEX,
    causal_lm_loss,
    causal_lm_loss_sum,
    causal_lm_token_losses,
    keytoken_weighted_loss,
    keytoken_weights,
)

VOCAB = 50
KEYS = torch.tensor([3, 7])


def course_keytoken_loss(inputs, logits, keytoken_ids, alpha=1.0):
    """The course's (ch.7 §6) formula, written from its description, with ``reduction="none"`` for ``reduce=False``."""
    shift_labels = inputs[:, 1:]  # (B, T-1)
    shift_logits = logits[:, :-1, :]  # (B, T-1, V)
    per_token = CrossEntropyLoss(reduction="none")(
        shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1)
    )  # (B*(T-1),)
    loss_per_sample = per_token.view(shift_labels.shape).mean(dim=1)  # (B,)
    # Key-token occurrences in the unshifted inputs, summed over every key token id.
    counts = torch.stack([(inputs == k).float() for k in keytoken_ids]).sum(dim=(0, 2))  # (B,)
    weights = alpha * (1.0 + counts)
    return (loss_per_sample * weights).mean()


@pytest.fixture(scope="module")
def gpt2():
    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=32)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture
def batch():
    """Logits (3, 8, 20) and inputs with 2, 0 and 4 key tokens (ids 3 and 7) per sample."""
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 8, 20, generator=generator) * 3
    inputs = torch.tensor(
        [
            [3, 1, 2, 5, 7, 9, 4, 11],
            [1, 2, 4, 5, 6, 8, 9, 10],
            [7, 7, 3, 12, 3, 0, 19, 18],
        ]
    )
    return inputs, logits


def test_causal_lm_loss_equals_gpt2_loss(gpt2):
    input_ids = torch.randint(0, VOCAB, (3, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = gpt2(input_ids=input_ids, labels=input_ids)
    ours = causal_lm_loss(out.logits, input_ids)
    assert abs(ours.item() - out.loss.item()) < 1e-6
    assert ours.item() > 3.0  # a random model: about log(50) = 3.9, not a trivially small value


def test_causal_lm_loss_ignores_minus_100_labels(gpt2):
    input_ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(3))
    labels = input_ids.clone()
    labels[0, 6:] = IGNORE_INDEX  # padding at the end of sample 0
    labels[1, 3] = IGNORE_INDEX
    with torch.no_grad():
        out = gpt2(input_ids=input_ids, labels=labels)
    ours = causal_lm_loss(out.logits, labels)
    assert abs(ours.item() - out.loss.item()) < 1e-6
    # By hand: mean of the per-token CE over the 9 + 9 - 4 - 1 = 13 valid shifted positions.
    token = causal_lm_token_losses(out.logits, labels)  # (2, 9)
    valid = labels[:, 1:] != IGNORE_INDEX
    assert int(valid.sum()) == 13
    assert torch.all(token[~valid] == 0)
    manual = torch.stack(
        [
            torch.nn.functional.cross_entropy(out.logits[b, t], labels[b, t + 1])
            for b in range(2)
            for t in range(9)
            if labels[b, t + 1] != IGNORE_INDEX
        ]
    ).mean()
    assert abs(ours.item() - manual.item()) < 1e-6
    total, count = causal_lm_loss_sum(out.logits, labels)
    assert int(count) == 13
    assert abs(total.item() / 13 - ours.item()) < 1e-6
    # Logits at positions that predict an ignored label do not matter.
    changed = out.logits.clone()
    changed[0, 5:] += 100 * torch.randn_like(changed[0, 5:])
    assert abs(causal_lm_loss(changed, labels).item() - ours.item()) < 1e-6


def test_keytoken_weights_count_unshifted_inputs(batch):
    inputs, _ = batch
    assert keytoken_weights(inputs, KEYS).tolist() == [3.0, 1.0, 5.0]
    assert keytoken_weights(inputs, KEYS, alpha=0.5).tolist() == [1.5, 0.5, 2.5]
    # A key token in position 0 (never a label after the shift) still counts, as in the course.
    assert keytoken_weights(torch.tensor([[7, 1, 1]]), KEYS).tolist() == [2.0]


@pytest.mark.parametrize("alpha", [1.0, 0.25, 3.0])
def test_unnormalized_is_the_course_formula(batch, alpha):
    inputs, logits = batch
    ours = keytoken_weighted_loss(inputs, logits, KEYS, alpha=alpha, normalize=False)
    course = course_keytoken_loss(inputs, logits, KEYS, alpha=alpha)
    assert abs(ours.item() - course.item()) < 1e-6
    # By hand from per-sample mean losses and weights 3, 1, 5 (times alpha), averaged over 3 samples.
    per_sample = causal_lm_token_losses(logits, inputs).mean(dim=1)
    expected = alpha * (3 * per_sample[0] + per_sample[1] + 5 * per_sample[2]) / 3
    assert abs(ours.item() - expected.item()) < 1e-5


def test_normalized_is_weighted_mean(batch):
    inputs, logits = batch
    per_sample = causal_lm_token_losses(logits, inputs).mean(dim=1)  # (3,)
    expected = (3 * per_sample[0] + per_sample[1] + 5 * per_sample[2]) / 9
    ours = keytoken_weighted_loss(inputs, logits, KEYS)  # normalize=True is the default
    assert abs(ours.item() - expected.item()) < 1e-6
    assert abs(ours.item() - keytoken_weighted_loss(inputs, logits, KEYS, normalize=False).item()) > 0.1


def test_normalized_equals_plain_cross_entropy_without_key_tokens(batch):
    inputs, logits = batch
    no_keys = torch.tensor([99, 98])
    plain = causal_lm_loss(logits, inputs)
    normalized = keytoken_weighted_loss(inputs, logits, no_keys, alpha=2.0)
    assert abs(normalized.item() - plain.item()) < 1e-6
    # The course's version is plain CE times alpha: its scale is the learning rate's business.
    course = keytoken_weighted_loss(inputs, logits, no_keys, alpha=2.0, normalize=False)
    assert abs(course.item() - 2 * plain.item()) < 1e-5


def test_normalized_is_invariant_to_alpha_course_is_not(batch):
    inputs, logits = batch
    base = keytoken_weighted_loss(inputs, logits, KEYS, alpha=1.0)
    course_base = course_keytoken_loss(inputs, logits, KEYS, alpha=1.0)
    for alpha in (0.1, 2.0, 10.0):
        assert abs(keytoken_weighted_loss(inputs, logits, KEYS, alpha=alpha).item() - base.item()) < 1e-5
        scaled = keytoken_weighted_loss(inputs, logits, KEYS, alpha=alpha, normalize=False)
        assert abs(scaled.item() - alpha * course_base.item()) < 1e-4


def test_course_formula_scales_with_keyword_density():
    # Uniform logits: every token costs exactly log(V), so any weighted *mean* of losses is log(V).
    vocab = 20
    logits = torch.zeros(2, 6, vocab)
    sparse = torch.tensor([[1, 2, 4, 5, 6, 8], [3, 2, 4, 5, 6, 8]])  # 0 and 1 key tokens
    dense = torch.tensor([[3, 7, 3, 7, 6, 8], [3, 3, 3, 3, 3, 7]])  # 4 and 6 key tokens
    for inputs, mean_weight in ((sparse, (1 + 2) / 2), (dense, (5 + 7) / 2)):
        normalized = keytoken_weighted_loss(inputs, logits, KEYS)
        course = keytoken_weighted_loss(inputs, logits, KEYS, normalize=False)
        assert abs(normalized.item() - math.log(vocab)) < 1e-6
        assert abs(course.item() - mean_weight * math.log(vocab)) < 1e-5
        assert abs(course.item() - course_keytoken_loss(inputs, logits, KEYS).item()) < 1e-6
