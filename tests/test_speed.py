"""The GPU speed path checked on CPU: SDPA against eager attention, TF32 switched on only for CUDA, the padded
vocabulary never predicted and trimmed by export, and torch.compile training the same losses as eager."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from transformers import AutoTokenizer, pipeline

from lmrecipes.export import save_hf_folder
from lmrecipes.losses import causal_lm_loss_sum
from lmrecipes.models.clm import CausalLM, build_gpt2
from lmrecipes.models.speed import allow_tf32, padded_vocab_size

TINY = {"n_layer": 2, "n_embd": 32, "n_head": 4, "n_positions": 64}


def clm(**kwargs) -> CausalLM:
    args = {"config": TINY, "vocab_size": 50, "bos_token_id": 0, "eos_token_id": 0, "seq_len": 64}
    return CausalLM(**(args | kwargs), optimizer={"lr": 1e-2, "warmup_steps": 0})


def test_sdpa_and_eager_attention_agree():
    ids = {"vocab_size": 50, "bos_token_id": 0, "eos_token_id": 0, "seq_len": 64}
    torch.manual_seed(0)
    sdpa = build_gpt2(TINY, **ids, attention="sdpa").eval()
    eager = build_gpt2(TINY, **ids, attention="eager").eval()
    eager.load_state_dict(sdpa.state_dict())
    assert (sdpa.config._attn_implementation, eager.config._attn_implementation) == ("sdpa", "eager")
    tokens = torch.randint(0, 50, (3, 40))  # (B, T)
    with torch.no_grad():
        a, b = sdpa(input_ids=tokens).logits, eager(input_ids=tokens).logits  # (B, T, V)
    assert (a - b).abs().max() < 1e-5
    loss_a, loss_b = causal_lm_loss_sum(a, tokens)[0], causal_lm_loss_sum(b, tokens)[0]
    assert abs(float(loss_a - loss_b)) / float(loss_b) < 1e-5
    assert clm(attention="eager").model.config._attn_implementation == "eager"


@pytest.mark.parametrize(("kwargs", "key"), [({"attention": "flash"}, "model.attention"),
                                             ({"vocab_multiple": 0}, "model.vocab_multiple")])  # fmt: skip
def test_speed_options_are_checked(kwargs, key):
    with pytest.raises(ValueError, match=key):
        clm(**kwargs)


def test_tf32_is_allowed_on_cuda_only():
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert not allow_tf32(torch.device("cpu"))
        assert torch.get_float32_matmul_precision() == "highest"
        assert allow_tf32(torch.device("cuda"))  # the setting itself needs no GPU
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)


def test_padded_rows_never_reach_the_loss():
    assert padded_vocab_size(50257, 64) == 50304 and padded_vocab_size(64, 64) == 64
    module = clm().eval()  # dropout off: the two losses below must be the same computation
    assert module.model.get_input_embeddings().num_embeddings == 64
    batch = {"input_ids": torch.randint(0, 50, (2, 16))}
    logits = module(batch["input_ids"])
    assert logits.shape == (2, 16, 50)
    loss, count = module.loss_sum(batch)
    with torch.no_grad():
        module.model.get_input_embeddings().weight[50:] = 1e4  # any value: the rows are cut off
    changed = module.loss_sum(batch)[0]
    assert torch.equal(changed, loss)
    changed.backward()
    assert module.model.get_input_embeddings().weight.grad[50:].abs().sum() == 0
    assert clm(vocab_multiple=1).model.get_input_embeddings().num_embeddings == 50


def test_padded_vocabulary_export_generates_the_same_tokens(tiny_lm, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm)
    vocab = len(tokenizer)
    torch.manual_seed(0)
    module = clm(vocab_size=vocab, tokenizer_path=str(tiny_lm)).eval()
    embedding = module.model.get_input_embeddings().weight  # (padded V, C), tied to the lm_head
    assert embedding.shape[0] == padded_vocab_size(vocab, 64) > vocab + 1
    with (
        torch.no_grad()
    ):  # two padded rows +-1000 x the real rows' sum: untrimmed, one of them would win argmax
        direction = embedding[:vocab].sum(0)
        embedding[vocab], embedding[vocab + 1] = 1000 * direction, -1000 * direction
    prompt = "def parse(text):\n    return"
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]  # (1, T)
    with torch.no_grad():
        for _ in range(12):  # greedy decoding through the module's own forward
            ids = torch.cat([ids, module(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    save_hf_folder(module, tmp_path / "export", card="test")
    generator = pipeline("text-generation", model=str(tmp_path / "export"), device="cpu")
    assert generator.model.config.vocab_size == vocab
    out = generator(prompt, max_new_tokens=12, do_sample=False, return_tensors=True)[0]["generated_token_ids"]
    assert list(out) == ids[0].tolist()


class Record(pl.Callback):
    def __init__(self, seen: list):
        self.seen = seen

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen.append(float(outputs["loss"]))


@pytest.mark.slow
def test_compiled_model_trains_the_same_losses_as_eager():
    torch.manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 50, (2, 16))}] * 4  # one batch again: its loss must fall
    losses = {}
    for compile in (False, True):
        torch.manual_seed(1)
        # dropout off: inductor draws its random masks differently from eager, which is not what is compared here
        no_dropout = TINY | {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
        module, seen = clm(compile=compile, config=no_dropout), []

        trainer = pl.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, callbacks=[Record(seen)])  # fmt: skip
        trainer.fit(module, torch.utils.data.DataLoader(batches, batch_size=None))
        assert (module._compiled is not False) == compile  # compiled, and did not fall back
        losses[compile] = seen
    assert losses[True] == pytest.approx(losses[False], abs=1e-4)
    assert losses[False][-1] < losses[False][0]  # it trained


@pytest.mark.slow
def test_compile_that_fails_on_the_platform_falls_back_to_eager_with_one_warning():
    import warnings

    torch.manual_seed(0)
    module, reference = clm(compile=True).eval(), clm().eval()
    reference.load_state_dict(module.state_dict())  # same names: compiling wrapped no module
    ids = torch.randint(0, 50, (2, 12))  # (B, T)
    torch._dynamo.reset()
    # a platform without a working C++ compiler, as inductor sees it (and no cached kernels to hide it)
    broken = {"cpp.cxx": ("/nonexistent/c++",), "fx_graph_cache": False}
    with torch._inductor.config.patch(broken), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            first, second = module(ids), module(ids)
    torch._dynamo.reset()
    assert module._compiled is False
    assert sum("torch.compile failed" in str(w.message) for w in caught) == 1
    with torch.no_grad():
        expected = reference(ids)
    assert torch.equal(first, expected) and torch.equal(second, expected)
