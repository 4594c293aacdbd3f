"""Checkpoint -> Hugging Face folder (safetensors, config, tokenizer, model card); generation from it."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import yaml

from lmrecipes.models.speed import export_vocab_size, trimmed_vocab

# The book's "first block": stop a completion where the next top-level statement starts.
_BLOCK_END = re.compile(r"\n(?:class |def |#|@|print|if |async def )")


def record_class(module, checkpoint: dict, trainer=None) -> None:
    """Store what export needs in ``checkpoint["lmrecipes"]``: the module's class path, the model's class and
    config and the tokenizer's files (so the checkpoint travels) and, given the ``trainer``, the metrics logged so
    far (plain floats) and the run folder (its curves.png goes into the model card)."""
    from lightning.pytorch.loggers import CSVLogger

    from lmrecipes.portable import portable_contents

    metrics, run_dir = {}, None
    if trainer is not None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        csv_logger = next((lg for lg in trainer.loggers if isinstance(lg, CSVLogger)), None)
        run_dir = str(Path(csv_logger.save_dir).resolve()) if csv_logger else None  # where curves.png goes
    cls = type(module)
    checkpoint.setdefault("lmrecipes", {}).update(  # beside ExactResume's RNG states
        class_path=f"{cls.__module__}.{cls.__qualname__}", metrics=metrics, run_dir=run_dir,
        **portable_contents(module),
    )  # fmt: skip


def model_card(checkpoint: dict) -> str:
    """A short README: what was trained, on what, for how long, and the last metrics."""
    meta = checkpoint.get("lmrecipes", {})
    hparams = {
        "model": checkpoint.get("hyper_parameters", {}),
        "data": checkpoint.get("datamodule_hyper_parameters", {}),
    }
    from lmrecipes.curves import final_metrics, run_curves

    logged = dict(meta.get("metrics", {}))
    if meta.get("run_dir") and Path(meta["run_dir"]).is_dir():
        logged.update(final_metrics(Path(meta["run_dir"])))  # the last validation values of the CSV log
    metrics = "\n".join(f"| {k} | {v:.4f} |" for k, v in sorted(logged.items()))
    curves = "![training curves](curves.png)\n\n" if run_curves(checkpoint) else ""
    return (
        "---\nlibrary_name: transformers\ntags: [lmrecipes]\n---\n\n"
        f"# {meta.get('class_path', 'model').rsplit('.', 1)[-1]} trained with lmrecipes\n\n"
        f"Optimizer steps: {checkpoint.get('global_step', 0)}, epochs: {checkpoint.get('epoch', 0)}.\n\n"
        f"| metric | value |\n|---|---|\n{metrics}\n\n{curves}"
        f"## Training configuration\n\n```yaml\n{yaml.safe_dump(hparams, sort_keys=False)}```\n"
    )


def save_hf_folder(module, out: Path, *, card: str, curves: Path | None = None) -> None:
    """Write a live module's model, tokenizer, card (and curves.png) to ``out``."""
    from transformers import AutoTokenizer

    from lmrecipes.portable import hf_model

    tokenizer_path = module.hparams.get("tokenizer_path")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path) if tokenizer_path else None
    vocab_size = export_vocab_size(dict(module.hparams))
    write_hf_folder(hf_model(module), tokenizer, out, card=card, curves=curves, vocab_size=vocab_size)


def write_hf_folder(
    model, tokenizer, out: Path, *, card: str, curves: Path | None = None, vocab_size: int | None = None
) -> None:
    """Write model, tokenizer (if any), card (and the run's curves.png, which the card shows) to ``out``;
    ``vocab_size``: trim a padded embedding back to the tokenizer's ids first."""
    if vocab_size is not None:
        model = trimmed_vocab(model, vocab_size)
    model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    (out / "README.md").write_text(card)
    if curves is not None:
        shutil.copyfile(curves, out / "curves.png")


def export_command(
    ckpt: str, out: str, *, overwrite: bool = False, push_to_hub: str | None = None, private: bool = True
) -> Path:
    """Export a checkpoint to a Hugging Face folder that ``transformers.pipeline`` loads offline.

    Args:
        ckpt: checkpoint written by ``lmrecipes fit``: a file, or a sharded folder (FSDP2), whose shards are
            assembled into the full model here, in one process.
        out: folder to create.
        overwrite: replace an existing ``out`` (otherwise an existing folder is an error and is left untouched).
        push_to_hub: also upload the folder to this Hub repo id (``create_repo`` + ``upload_folder``).
        private: create the Hub repo as private.
    """
    out_path = Path(out)
    if out_path.exists() and not overwrite:
        raise ValueError(f"{out} already exists; pass --overwrite true to replace it")
    from lmrecipes.portable import hf_from_checkpoint

    model, tokenizer, checkpoint = hf_from_checkpoint(ckpt)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    staging = out_path.with_name(out_path.name + ".tmp-export")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    from lmrecipes.curves import run_curves

    card, curves = model_card(checkpoint), run_curves(checkpoint)
    vocab_size = export_vocab_size(checkpoint.get("hyper_parameters", {}))  # a padded embedding is trimmed
    write_hf_folder(model, tokenizer, staging, card=card, curves=curves, vocab_size=vocab_size)
    if out_path.exists():
        shutil.rmtree(out_path)
    staging.rename(out_path)  # a failed export never leaves a half-written `out`
    print(f"exported {ckpt} -> {out_path}")
    if push_to_hub:
        push_folder(out_path, push_to_hub, private=private)
    return out_path


def push_folder(
    folder: Path, repo_id: str, *, private: bool = True, message: str = "lmrecipes export"
) -> None:
    """Upload ``folder`` to a Hub model repo (huggingface_hub 2: ``create_repo`` + ``upload_folder``)."""
    from huggingface_hub import create_repo, upload_folder

    create_repo(repo_id, private=private, exist_ok=True)
    upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=message)


def first_block(text: str) -> str:
    """The completion up to the next top-level statement (the book's filter for function completions)."""
    return _BLOCK_END.split(text, maxsplit=1)[0].rstrip()


def generate(
    model_dir: str,
    prompts: list[str],
    *,
    max_new_tokens: int = 64,
    max_length: int | None = None,
    temperature: float = 0.8,
    top_k: int = 50,
    top_p: float = 0.95,
    num_return_sequences: int = 1,
    seed: int = 0,
    only_first_block: bool = False,
    do_sample: bool = True,
) -> list[list[str]]:
    """Completions (prompt excluded) for each prompt, sampled with a fixed seed; ``max_length`` (the prompt's
    tokens included, as the book's pipeline call) replaces ``max_new_tokens`` when given."""
    from transformers import set_seed

    from lmrecipes.portable import load_pipeline

    set_seed(seed)
    generator = load_pipeline("text-generation", model_dir)
    eos = generator.tokenizer.eos_token_id
    context = (
        getattr(generator.model.config, "n_positions", None) or generator.model.config.max_position_embeddings
    )
    results = []
    for prompt in prompts:
        prompt_len = len(generator.tokenizer(prompt)["input_ids"])
        if prompt_len >= min(context, max_length or context):
            raise ValueError(f"the prompt has {prompt_len} tokens; the model's context is {context}"
                             + (f" and max_length is {max_length}" if max_length else ""))  # fmt: skip
        outputs = generator(
            prompt,
            max_new_tokens=min(
                max_new_tokens if max_length is None else max_length - prompt_len, context - prompt_len
            ),  # fmt: skip
            do_sample=do_sample,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            num_return_sequences=num_return_sequences,
            pad_token_id=eos,
            return_full_text=False,
        )
        texts = [o["generated_text"] for o in outputs]
        results.append([first_block(t) if only_first_block else t for t in texts])
    return results


# Sampling settings by name; explicit options win over a preset's.
GENERATE_PRESETS = {
    "default": {"max_new_tokens": 64, "temperature": 0.8, "top_k": 50, "top_p": 0.95, "num_return_sequences": 1,
                "seed": 0, "first_block": False},
    # Book ch.10 ("Results and Analysis"): complete_code(): temperature 0.4, top_p 0.95, top_k 0, 4 completions,
    # set_seed(1), first_block; its max_length=64 counts the prompt's tokens too.
    "book": {"max_length": 64, "temperature": 0.4, "top_k": 0, "top_p": 0.95, "num_return_sequences": 4,
             "seed": 1, "first_block": True},
}  # fmt: skip


def generate_command(
    model: str,
    *,
    prompt: list[str] | str,
    preset: str = "default",
    max_new_tokens: int | None = None,
    max_length: int | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    num_return_sequences: int | None = None,
    seed: int | None = None,
    first_block: bool | None = None,
    greedy: bool = False,
    json_out: bool = False,
) -> list[list[str]]:
    """Sample code completions from an exported model folder.

    Args:
        model: exported folder, checkpoint written by ``lmrecipes fit``, or any causal-LM folder with a tokenizer.
        prompt: a prompt, or several as a list (``--prompt '["a", "b"]'``).
        preset: sampling settings by name: ``default`` or ``book`` (the book's complete_code: temperature 0.4,
            top-p 0.95, top-k 0, 4 completions, seed 1, first_block, 64 tokens with the prompt).
        max_new_tokens: tokens to generate per completion (default 64).
        max_length: tokens per completion counting the prompt (the book's max_length); wins over max_new_tokens.
        temperature: sampling temperature (default 0.8).
        top_k: keep the k most likely tokens (0 = off; default 50).
        top_p: nucleus sampling mass (default 0.95).
        num_return_sequences: completions per prompt (default 1).
        seed: sampling seed (default 0).
        first_block: cut each completion at the next top-level def/class/if/print/comment (the book's filter).
        greedy: greedy decoding instead of sampling.
        json_out: print JSON instead of text.
    """
    if preset not in GENERATE_PRESETS:
        raise ValueError(f"preset={preset!r} is not one of {sorted(GENERATE_PRESETS)}")
    given = {"max_new_tokens": max_new_tokens, "max_length": max_length, "temperature": temperature,
             "top_k": top_k, "top_p": top_p, "num_return_sequences": num_return_sequences, "seed": seed,
             "first_block": first_block}  # fmt: skip
    settings = {**GENERATE_PRESETS["default"], **GENERATE_PRESETS[preset]}
    settings.update({k: v for k, v in given.items() if v is not None})
    if max_new_tokens is not None:
        settings.pop("max_length", None)  # an explicit max_new_tokens wins over a preset's max_length
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        raise ValueError("--prompt is empty; expected a prompt or a list of prompts")
    results = generate(
        model,
        prompts,
        max_new_tokens=settings["max_new_tokens"],
        max_length=settings.get("max_length"),
        temperature=settings["temperature"],
        top_k=settings["top_k"],
        top_p=settings["top_p"],
        num_return_sequences=settings["num_return_sequences"],
        seed=settings["seed"],
        only_first_block=settings["first_block"],
        do_sample=not greedy,
    )
    if json_out:
        print(json.dumps([{"prompt": p, "completions": c} for p, c in zip(prompts, results)], indent=2))
    else:
        for p, completions in zip(prompts, results):
            for c in completions:
                print(f"{p}{c}\n{'-' * 40}")
    return results


def fill_mask(model_dir: str, texts: list[str], *, top_k: int = 5) -> list[list[dict]]:
    """Top-k predictions for the mask token in each text (``[MASK]`` is replaced by the model's own mask token)."""
    from lmrecipes.portable import load_pipeline

    filler = load_pipeline("fill-mask", model_dir, top_k=top_k)
    mask = filler.tokenizer.mask_token
    results = []
    for text in texts:
        text = text.replace("[MASK]", mask)
        if mask not in text:
            raise ValueError(f"{text!r} has no {mask} token to fill")
        predictions = filler(text)
        results.append(predictions if isinstance(predictions[0], dict) else predictions[0])
    return results


def fill_mask_command(
    model: str, text: str, *, more: list[str] | None = None, top_k: int = 5, json_out: bool = False
) -> list[list[dict]]:
    """Print the top-k completions of ``[MASK]`` in a text with an exported masked-LM folder.

    Args:
        model: exported folder, checkpoint written by ``lmrecipes fit``, or any masked-LM folder with a tokenizer.
        text: a text containing ``[MASK]``, e.g. "This is a great [MASK]."
        more: further texts.
        top_k: predictions per text.
        json_out: print JSON instead of a table.
    """
    text = [text, *(more or [])]
    results = fill_mask(model, text, top_k=top_k)
    if json_out:
        print(
            json.dumps(
                [
                    {"text": t, "predictions": [{"token": p["token_str"], "score": p["score"]} for p in r]}
                    for t, r in zip(text, results)
                ],
                indent=2,
            )
        )
    else:
        for t, predictions in zip(text, results):
            print(t)
            for p in predictions:
                print(f"  {p['score']:.3f}  {p['sequence']}")
    return results
