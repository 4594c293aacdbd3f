"""The causal-LM LightningModule: GPT-2 from a config (or a pretrained folder), CE or key-token weighted loss."""

from __future__ import annotations

from dataclasses import asdict

import torch
from torch.distributed.tensor import DTensor

from lmrecipes.losses import causal_lm_loss_sum, keytoken_weighted_loss_sum
from lmrecipes.models.base import RecipeModule
from lmrecipes.models.speed import ATTENTION, compiled_or_eager, padded_vocab_size
from lmrecipes.optim import OptimizerConfig

LOSSES = ("ce", "keytoken", "keytoken_course")
# course ch.7 §6: learning_rate=5e-4, weight_decay=0.1, lr_scheduler_type="cosine", warmup_steps=1_000
DEFAULT_OPTIMIZER = OptimizerConfig(lr=5e-4, weight_decay=0.1, lr_schedule="cosine", warmup_steps=1000)


def build_gpt2(
    config: dict,
    *,
    vocab_size: int,
    bos_token_id: int,
    eos_token_id: int,
    seq_len: int,
    attention: str = "sdpa",
):
    """``GPT2LMHeadModel`` from config keys, with the data-derived values filled in (``vocab_size``: the
    embedding's rows, padded or not)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    known = set(GPT2Config().to_dict())
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(f"model.config has keys GPT2Config does not know: {unknown}")
    cfg = GPT2Config(
        **{
            "n_positions": max(seq_len, 1024),
            **config,
            "vocab_size": vocab_size,
            "bos_token_id": bos_token_id,
            "eos_token_id": eos_token_id,
            "attn_implementation": attention,
        }
    )
    return GPT2LMHeadModel(cfg)


def load_pretrained(path: str, attention: str = "sdpa"):
    from transformers import AutoModelForCausalLM

    # from_pretrained returns eval mode, which Lightning keeps: dropout would stay off during fine-tuning
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation=attention).train()


class CausalLM(RecipeModule):
    """GPT-2-style causal LM; logs ``train/loss``, ``val/loss``, ``val/ppl`` (token-weighted over batches and ranks)."""

    pipeline_task = "text-generation"

    def __init__(
        self,
        *,
        config: dict | None = None,
        pretrained: str | None = None,
        vocab_size: int = 50257,
        bos_token_id: int = 50256,
        eos_token_id: int = 50256,
        seq_len: int = 1024,
        tokenizer_path: str | None = None,
        loss: str = "ce",
        keytokens: list[str] | None = None,
        keytoken_alpha: float = 1.0,
        optimizer: OptimizerConfig = DEFAULT_OPTIMIZER,
        activation_checkpointing: bool = False,
        compile: bool = False,
        attention: str = "sdpa",
        vocab_multiple: int = 64,
    ):
        """
        Args:
            config: ``GPT2Config`` keys (``n_layer``, ``n_embd``, ``n_head``, ``n_positions``...); empty = GPT-2 small.
            pretrained: a causal-LM folder or Hub id to start from instead of ``config``.
            vocab_size: linked from the tokenizer.
            bos_token_id: linked from the tokenizer.
            eos_token_id: linked from the tokenizer.
            seq_len: linked from the data; must fit the model's ``n_positions``.
            tokenizer_path: linked from the data; exported with the model and used for key tokens.
            loss: ``ce``; ``keytoken`` (course's weighted loss divided by the weights' sum); ``keytoken_course``
                (the course's formula exactly: mean of weighted per-sample losses).
            keytokens: key tokens for the weighted losses (default: the course's plt, pd, sk, fit, predict).
            keytoken_alpha: the course's ``alpha`` weight scale.
            optimizer: AdamW and its schedule (default: the course's, ch.7 §6).
            activation_checkpointing: recompute activations in backward to save memory.
            compile: ``torch.compile`` the model's forward; where compiling fails (no C++ compiler or Triton),
                warn once and train without it.
            attention: ``sdpa`` (torch's fused attention kernels) or ``eager`` (the reference matmul + softmax).
            vocab_multiple: pad a model built from ``config`` to a multiple of this many token rows (64: GPT-2's
                50,257 -> 50,304) for the tensor cores; the padded ids are never predicted (their logits are cut
                off before the loss and generation) and export trims them. 1: no padding. Ignored with
                ``pretrained``, whose embedding is kept as it is.
        """
        super().__init__(optimizer)
        # checkpoints' hyper-parameters hold plain types only (weights_only loading): the optimizer as a dict
        optimizer = asdict(self.optimizer_config)
        self.save_hyperparameters()
        if loss not in LOSSES:
            raise ValueError(f"model.loss={loss!r} is not one of {LOSSES}")
        if attention not in ATTENTION:
            raise ValueError(f"model.attention={attention!r} is not one of {ATTENTION}")
        rows = padded_vocab_size(vocab_size, vocab_multiple)
        self.model = (
            load_pretrained(pretrained, attention)
            if pretrained
            else build_gpt2(
                config or {},
                vocab_size=rows,
                bos_token_id=bos_token_id,
                eos_token_id=eos_token_id,
                seq_len=seq_len,
                attention=attention,
            )
        )
        self._check_fits(vocab_size, seq_len)
        self.register_buffer("keytoken_ids", self._keytoken_ids(), persistent=False)
        if activation_checkpointing:
            self.model.activation_checkpointing_enable({"use_reentrant": False})  # transformers 5 name
        # compiled at the first forward (after any sharding or device move); False once compiling failed
        self._compiled = None if compile else False

    def _check_fits(self, vocab_size: int, seq_len: int) -> None:
        cfg = self.model.config
        if vocab_size > cfg.vocab_size:
            raise ValueError(
                f"the tokenizer has {vocab_size} tokens but the model's embedding has only {cfg.vocab_size}; "
                "use a matching tokenizer or a model built from config"
            )
        if seq_len > cfg.n_positions:
            raise ValueError(
                f"data.packing.seq_len={seq_len} exceeds the model's n_positions={cfg.n_positions}"
            )

    def _keytoken_ids(self) -> torch.Tensor:
        if self.hparams.loss == "ce":
            return torch.zeros(0, dtype=torch.long)
        from transformers import AutoTokenizer

        from lmrecipes.bpe import DEFAULT_KEYTOKENS, resolve_keytoken_ids

        if not self.hparams.tokenizer_path:
            raise ValueError(
                f"model.loss={self.hparams.loss!r} needs model.tokenizer_path to find key tokens"
            )
        tokenizer = AutoTokenizer.from_pretrained(self.hparams.tokenizer_path)
        return torch.tensor(resolve_keytoken_ids(tokenizer, self.hparams.keytokens or DEFAULT_KEYTOKENS))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits over the tokenizer's ``vocab_size`` ids: a padded embedding's extra rows are cut off here, so
        no loss, metric or generation ever sees them."""
        if self._compiled is None:
            # nn.Module.compile compiles the module's call, hooks included: FSDP2's root pre-forward (which gathers
            # the DTensor parameters) still runs, and no wrapper module enters the state_dict's names
            self.model.compile()
            self._compiled = True
        if self._compiled is False:
            out = self.model(input_ids=input_ids, use_cache=False)
        else:
            self._compiled, out = compiled_or_eager(self.model, input_ids=input_ids, use_cache=False)
        return out.logits[..., : self.hparams.vocab_size]  # (B, T, V)

    def loss_sum(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        input_ids = batch["input_ids"]  # (B, T)
        logits = self(input_ids)  # (B, T, V)
        if self.hparams.loss == "ce":
            return causal_lm_loss_sum(logits, input_ids)
        normalize = self.hparams.loss == "keytoken"
        return keytoken_weighted_loss_sum(
            input_ids, logits, self.keytoken_ids, alpha=self.hparams.keytoken_alpha, normalize=normalize
        )

    def eval_loss_sum(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        input_ids = batch["input_ids"]  # (B, T)
        # plain cross-entropy whatever the training loss: val/ppl compares with the course's
        return causal_lm_loss_sum(self(input_ids), input_ids)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self._unpad_for_old_checkpoint(checkpoint)

    def _unpad_for_old_checkpoint(self, checkpoint: dict) -> None:
        """A checkpoint written before ``vocab_multiple`` existed holds an unpadded embedding, and its hparams lack
        the key, so this module was built with the default padding: take the old behaviour (1, no padding)."""
        if "vocab_multiple" in checkpoint.get("hyper_parameters", {}) or self.hparams.pretrained:
            return
        weight = self.model.get_input_embeddings().weight
        name = next(n for n, p in self.named_parameters() if p is weight)
        stored = checkpoint.get("state_dict", {}).get(name)
        if stored is None or stored.shape[0] == weight.shape[0]:
            return
        if isinstance(weight, DTensor):  # built and sharded before this hook: too late to resize
            raise ValueError(
                f"the checkpoint's embedding has {stored.shape[0]} rows and no model.vocab_multiple (written "
                f"before it existed); this model has {weight.shape[0]}: pass --model.init_args.vocab_multiple 1"
            )
        self.model.resize_token_embeddings(stored.shape[0], mean_resizing=False)
        self.hparams.vocab_multiple = 1  # saved again with the key: the next load builds it unpadded at once
