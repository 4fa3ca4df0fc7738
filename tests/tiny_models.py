"""Tiny random models and a word-level tokenizer built in-process: milliseconds, no files, no downloads."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

VOCAB = 256

# name → (architecture, query heads, KV heads)
ARCHITECTURES = {
    "llama-gqa": ("llama", 4, 2),
    "llama-mha": ("llama", 4, 4),
    "qwen2-gqa": ("qwen2", 6, 2),
    "qwen2-mha": ("qwen2", 2, 2),
}


def tiny_model(kind: str = "llama-gqa", layers: int = 3, seed: int = 0, vocab: int = VOCAB) -> torch.nn.Module:
    """A random causal LM of the given architecture, fp32, eval mode, deterministic from `seed`."""
    arch, heads, kv_heads = ARCHITECTURES[kind]
    common = dict(
        vocab_size=vocab,
        hidden_size=16 * heads,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common, use_sliding_window=False))
    # Random init gives near-uniform logits; a larger embedding scale makes greedy choices decisive.
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(40)
    return model.eval()


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def tiny_tokenizer(chat_template: bool = True) -> PreTrainedTokenizerFast:
    """Whitespace word-level tokenizer over a fixed vocabulary (unknown words map to <unk>)."""
    words = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
    words += [f"w{i}" for i in range(VOCAB - len(words) - 10)] + list("0123456789")
    vocab = {w: i for i, w in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def random_ids(n: int, seed: int = 0, low: int = 8) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(low, VOCAB - 10, (n,), generator=generator).tolist()
