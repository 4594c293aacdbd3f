"""Weight-decay groups on a real GPT-2 and warmup schedules against transformers' own."""

import pytest
import torch
import transformers
from transformers import GPT2Config, GPT2LMHeadModel

from lmrecipes.optim import (
    OptimizerConfig,
    adamw_kernel,
    build_optimizer,
    param_groups,
    split_decay_params,
    warmup_lambda,
)


@pytest.fixture(scope="module")
def gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100))


def _expected_groups():
    decay = ["transformer.wte.weight", "transformer.wpe.weight"]
    no_decay = []
    for i in range(2):
        h = f"transformer.h.{i}"
        for ln in ("ln_1", "ln_2"):
            no_decay += [f"{h}.{ln}.weight", f"{h}.{ln}.bias"]
        for lin in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            decay.append(f"{h}.{lin}.weight")
            no_decay.append(f"{h}.{lin}.bias")
    no_decay += ["transformer.ln_f.weight", "transformer.ln_f.bias"]
    return decay, no_decay


def test_split_decay_params_by_module_type(gpt2):
    decay, no_decay = split_decay_params(gpt2)
    want_decay, want_no_decay = _expected_groups()
    assert sorted(decay) == sorted(want_decay)
    assert sorted(no_decay) == sorted(want_no_decay)
    assert len(decay) + len(no_decay) == len(set(decay) | set(no_decay)) == 28
    # The tied lm_head is wte itself: listed once, under its embedding name.
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight
    assert "lm_head.weight" not in decay + no_decay
    unique_tensors = {id(p) for p in gpt2.parameters()}
    assert len(unique_tensors) == 28


def test_course_string_match_misses_gpt2_layer_norms(gpt2):
    decay, no_decay = split_decay_params(gpt2)
    names = [n for n, _ in gpt2.named_parameters()]
    course_no_decay = [n for n in names if any(nd in n for nd in ("bias", "LayerNorm.weight"))]
    ln_weights = [n for n in names if n.split(".")[-2] in ("ln_1", "ln_2", "ln_f") and n.endswith("weight")]
    assert len(ln_weights) == 5
    # The course would decay all five layer-norm weights towards 0; we never do.
    assert not set(ln_weights) & set(course_no_decay)
    assert set(ln_weights) <= set(no_decay)
    assert set(course_no_decay) == {n for n in no_decay if n.endswith("bias")}


def test_param_groups_hold_the_tensors(gpt2):
    groups = param_groups(gpt2, 0.1)
    decay, no_decay = split_decay_params(gpt2)
    params = dict(gpt2.named_parameters())
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert [id(p) for p in groups[0]["params"]] == [id(params[n]) for n in decay]
    assert [id(p) for p in groups[1]["params"]] == [id(params[n]) for n in no_decay]


def test_build_optimizer_groups_and_schedule(gpt2):
    config = OptimizerConfig(
        lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), lr_schedule="cosine", warmup_steps=10
    )
    optimizer, scheduler = build_optimizer(gpt2, config, total_steps=50)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert len(optimizer.param_groups) == 2
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    assert [len(g["params"]) for g in optimizer.param_groups] == [10, 18]
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.95)
    assert optimizer.param_groups[0]["lr"] == 0.0  # warmup starts at 0
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    assert abs(optimizer.param_groups[1]["lr"] - 5e-4) < 1e-12


@pytest.mark.parametrize(
    "schedule, reference",
    [
        ("cosine", transformers.get_cosine_schedule_with_warmup),
        ("linear", transformers.get_linear_schedule_with_warmup),
        ("constant", transformers.get_constant_schedule_with_warmup),
    ],
)
def test_warmup_lambda_matches_transformers(schedule, reference):
    ours = warmup_lambda(schedule, 10, 50)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    kwargs = {"num_warmup_steps": 10}
    if schedule != "constant":
        kwargs["num_training_steps"] = 50
    theirs = reference(optimizer, **kwargs).lr_lambdas[0]
    values = [ours(s) for s in range(51)]
    for step in range(51):
        assert abs(values[step] - theirs(step)) < 1e-9, step
    assert values[0] == 0.0 and values[5] == 0.5 and values[10] == 1.0
    if schedule != "constant":
        assert values[50] == pytest.approx(0.0, abs=1e-12)
        assert all(a >= b for a, b in zip(values[10:], values[11:]))  # decays monotonically after warmup


def test_min_lr_ratio_floors_the_decay():
    cosine = warmup_lambda("cosine", 10, 50, min_lr_ratio=0.1)
    linear = warmup_lambda("linear", 10, 50, min_lr_ratio=0.1)
    assert cosine(50) == pytest.approx(0.1) and linear(50) == pytest.approx(0.1)
    assert cosine(500) == pytest.approx(0.1) and linear(500) == pytest.approx(0.1)  # stays at the floor
    assert cosine(30) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way: cos(pi/2) = 0
    assert linear(20) == pytest.approx(0.1 + 0.9 * 0.75)
    assert min(cosine(s) for s in range(10, 200)) == pytest.approx(0.1)
    assert cosine(5) == 0.5  # the warmup ramp is not floored
    assert warmup_lambda("constant", 10, 50, min_lr_ratio=0.1)(40) == 1.0
    reference = transformers.get_cosine_with_min_lr_schedule_with_warmup(
        torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0),
        num_warmup_steps=10,
        num_training_steps=50,
        min_lr_rate=0.1,
    ).lr_lambdas[0]
    for step in range(51):
        assert abs(cosine(step) - reference(step)) < 1e-9, step


def test_bad_schedule_arguments_raise():
    with pytest.raises(ValueError, match="lr_schedule='polynomial'"):
        warmup_lambda("polynomial", 10, 50)
    with pytest.raises(ValueError, match="positive"):
        warmup_lambda("cosine", 10, 0)


def test_optimizer_config_is_a_plain_dict_in_checkpoints(tmp_path):
    import lightning.pytorch as pl

    from lmrecipes.models.clm import CausalLM

    config = OptimizerConfig(lr=2e-4, betas=(0.9, 0.95), lr_schedule="constant", min_lr_ratio=0.1)
    model = CausalLM(config={"n_layer": 1, "n_embd": 16, "n_head": 2, "n_positions": 16}, vocab_size=32,
                     bos_token_id=0, eos_token_id=0, seq_len=16, optimizer=config)  # fmt: skip
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    batch = {"input_ids": torch.randint(0, 32, (2, 16), generator=torch.Generator().manual_seed(0))}
    trainer.fit(model, train_dataloaders=torch.utils.data.DataLoader([batch], batch_size=None))
    trainer.save_checkpoint(tmp_path / "one.ckpt")
    hparams = torch.load(tmp_path / "one.ckpt", weights_only=True)["hyper_parameters"]
    assert hparams["optimizer"] == {"lr": 2e-4, "weight_decay": 0.0, "betas": (0.9, 0.95), "eps": 1e-8,
                                    "lr_schedule": "constant", "warmup_steps": 0, "min_lr_ratio": 0.1}  # fmt: skip
    assert CausalLM.load_from_checkpoint(tmp_path / "one.ckpt").optimizer_config == config


def test_adamw_uses_the_fused_kernel_where_torch_has_one(gpt2):
    # CPU has torch's fused AdamW (the HF Trainer's default, and the bench's speed-up); a device without one
    # (meta stands in for any other accelerator here) falls back to torch's default choice.
    optimizer, _ = build_optimizer(gpt2, OptimizerConfig(), total_steps=10)
    assert optimizer.defaults["fused"] is True
    assert adamw_kernel([torch.zeros(2, device="meta")]) == {"foreach": None}
    plain, _ = build_optimizer(gpt2, OptimizerConfig(), total_steps=10, fused=False)
    assert not plain.defaults["fused"]
