"""Small Hugging Face language models built from configs (random init, no download), as
`target.kind: python` factories for the tests."""

from __future__ import annotations

import torch

from spdkit.targets.hf import RandomTokens

VOCAB, SEQ = 61, 12

# the `target` section of a config that decomposes `tiny_llama` on random tokens
LLAMA_TARGET = {
    "kind": "python",
    "factory": "tests.hf_models:tiny_llama",
    "data_factory": "tests.hf_models:tokens",
    "lm": True,
}


def tiny_llama(n_layers: int = 3, use_cache: bool = False) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        use_cache=use_cache,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(n_layers: int = 3, use_cache: bool = False) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=n_layers, n_head=4, use_cache=use_cache
    )
    return GPT2LMHeadModel(config).eval()


def tokens() -> RandomTokens:
    return RandomTokens(VOCAB, SEQ)


def char_tokenizer(vocab_size: int = VOCAB):
    """A byte-pair tokenizer trained offline on a few sentences (`tokenizers`), with an EOS
    token, as a transformers tokenizer that `save_pretrained` writes next to a model."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<eos>"])
    tok.train_from_iterator(SENTENCES * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


SENTENCES = [
    "the cat sat on the mat and the dog sat on the log",
    "a bird in the hand is worth two in the bush",
    "to be or not to be that is the question",
    "all that glitters is not gold",
]


def tiny_bert(n_layers: int = 2) -> torch.nn.Module:
    """An encoder (BertModel): its output has `last_hidden_state` and `pooler_output`, no logits."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=64,
    )
    return BertModel(config).eval()
