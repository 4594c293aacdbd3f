"""Code completions as the CodeParrot HumanEval evaluation makes them, with one seed per (problem, sample).

The prompt is stripped and prefixed with the EOS token; each sequence stops on its own at the first stop string
(the next top-level statement) or at EOS, and is cut there. Every sample draws from its own generator, seeded from
(seed, problem, sample), so a sample does not depend on the batch it was generated in nor on the number of
processes that shared the work. ``transformers``' ``generate`` draws a whole batch from the global generator,
which ties each sample to its batch mates: that is why the decoding loop is written here.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

import torch

STOP_STRINGS = ("\nclass", "\ndef", "\n#", "\n@", "\nif", "\nprint")

# CodeParrot's evaluation presets (its scripts/human_eval.py and README): 200 samples per problem, top-p 0.95,
# temperature 0.2 for pass@1 and 0.8 for pass@10/100; "greedy" is one deterministic sample per problem.
PRESETS: dict[str, dict] = {
    "pass@1": {"temperature": 0.2, "top_p": 0.95, "top_k": 0, "n": 200, "greedy": False},
    "pass@100": {"temperature": 0.8, "top_p": 0.95, "top_k": 0, "n": 200, "greedy": False},
    "greedy": {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "n": 1, "greedy": True},
}


@dataclass(frozen=True)
class Sampling:
    """How completions are drawn; recorded in the results JSON and checked when an evaluation continues."""

    n: int = 200
    temperature: float = 0.2
    top_p: float = 0.95
    top_k: int = 0
    greedy: bool = False
    max_new_tokens: int = 256
    seed: int = 0
    stop_strings: tuple[str, ...] = STOP_STRINGS

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"n={self.n}: the number of samples per problem must be at least 1")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be at least 1")
        if not self.greedy and self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature} must be > 0 (use the greedy preset for argmax)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0 = off)")

    def as_dict(self) -> dict:
        return {**asdict(self), "stop_strings": list(self.stop_strings)}


def sampling_from_preset(preset: str, **overrides) -> Sampling:
    """A preset's values with every non-None override applied (``--n``, ``--temperature``...)."""
    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r}; accepted: {', '.join(PRESETS)}")
    values = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
    if "stop_strings" in values:
        values["stop_strings"] = tuple(values["stop_strings"])
    return Sampling(**values)


def sample_seed(seed: int, task_id: str, sample: int) -> int:
    """A 63-bit seed that depends only on (seed, task, sample index)."""
    digest = hashlib.blake2b(f"{seed}\0{task_id}\0{sample}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def cut_at_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """``text`` up to the first stop string, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text, False) if cut < 0 else (text[:cut], True)


def prompt_ids(tokenizer, prompt: str, *, context: int, max_new_tokens: int) -> tuple[list[int], bool]:
    """EOS + the stripped prompt as token ids, keeping the last tokens when it does not leave room to generate."""
    if tokenizer.eos_token is None:
        raise ValueError(
            "the tokenizer has no EOS token: HumanEval prompts are prefixed with it (CodeParrot's evaluation) "
            "and generation stops on it; set tokenizer.eos_token"
        )
    ids = tokenizer(tokenizer.eos_token + prompt.strip(), add_special_tokens=False)["input_ids"]
    room = context - max_new_tokens
    if room < 1:
        raise ValueError(
            f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's context of {context}"
        )
    return (ids[-room:], True) if len(ids) > room else (ids, False)


def model_context(model) -> int:
    config = model.config
    return getattr(config, "n_positions", None) or config.max_position_embeddings


@torch.no_grad()
def complete(model, tokenizer, prompt: str, seeds: list[int], sampling: Sampling) -> tuple[list[str], bool]:
    """One completion per seed for ``prompt`` (generated together as one batch), and whether the prompt was
    cut to fit the context. ``model`` must be in eval mode; nothing is drawn from the global generators."""
    device = next(model.parameters()).device
    ids, truncated = prompt_ids(
        tokenizer, prompt, context=model_context(model), max_new_tokens=sampling.max_new_tokens
    )
    batch = len(seeds)
    inputs = torch.tensor([ids], device=device).expand(batch, -1)  # (B, T)
    generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
    tokens: list[list[int]] = [[] for _ in range(batch)]
    texts, done = [""] * batch, [False] * batch
    window = (
        max(len(stop) for stop in sampling.stop_strings) + 8
    )  # tokens: every one decodes to a character or more
    cache_arg = _cache_argument(model)
    cache = None
    for _ in range(sampling.max_new_tokens):
        out = model(input_ids=inputs, use_cache=True, logits_to_keep=1, **{cache_arg: cache})
        cache = out.get(cache_arg)
        # a vocabulary padded for the tensor cores (model.vocab_multiple) has rows no token id stands for
        logits = out.logits[:, -1, : len(tokenizer)].float()  # (B, V)
        chosen = _choose(logits, generators, sampling)  # (B,)
        for row in range(batch):
            if done[row]:
                continue
            token = int(chosen[row])
            if token == tokenizer.eos_token_id:
                done[row] = True
                continue
            tokens[row].append(token)
            # A new stop string ends within the newest tokens: decode those alone at each step (decoding the whole
            # completion every step is quadratic in its length), the whole text only when one shows up.
            if any(stop in tokenizer.decode(tokens[row][-window:]) for stop in sampling.stop_strings):
                texts[row], done[row] = cut_at_stop(tokenizer.decode(tokens[row]), sampling.stop_strings)
        if all(done):
            break
        inputs = chosen[:, None]  # (B, 1)
    for row in range(batch):
        if not done[row] or not texts[row]:  # ran out of tokens, or stopped at EOS
            texts[row] = cut_at_stop(tokenizer.decode(tokens[row]), sampling.stop_strings)[0]
    return texts, truncated


def _cache_argument(model) -> str:
    # transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old name warns); both are supported
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _choose(logits: torch.Tensor, generators: list[torch.Generator], sampling: Sampling) -> torch.Tensor:
    """The next token of each row: argmax, or a draw from the row's own generator after temperature/top-k/top-p."""
    if sampling.greedy:
        return logits.argmax(dim=-1)
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    scores = logits / sampling.temperature  # (B, V)
    if sampling.top_k:
        scores = TopKLogitsWarper(sampling.top_k)(None, scores)
    if sampling.top_p < 1.0:
        scores = TopPLogitsWarper(sampling.top_p)(None, scores)
    probs = torch.softmax(scores, dim=-1)  # (B, V)
    return torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generators)])  # (B,)
