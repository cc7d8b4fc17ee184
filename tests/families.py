"""Small random-weight transformers models of several families, saved with save_pretrained beside a byte-level
BPE tokenizer with an end-of-text token: folders the project never trained, as a new user brings them."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 384
# model_type -> config keywords (hidden 64, 2 layers, 4 heads, 256 positions); gpt2 is GPT2LMHeadModel, whose
# class name does not end in ForCausalLM, and whose linear layers are transformers' Conv1D
CAUSAL = {
    "gpt2": {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 256},
    "gpt_neox": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
                 "max_position_embeddings": 256},
    "opt": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "ffn_dim": 128,
            "max_position_embeddings": 256, "word_embed_proj_dim": 64},
    "qwen2": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "intermediate_size": 128, "max_position_embeddings": 256},
    "mistral": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                "intermediate_size": 128, "max_position_embeddings": 256},
    "phi3": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
             "intermediate_size": 128, "max_position_embeddings": 256, "pad_token_id": 0},
}
ENCODER = {"bert": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
                    "max_position_embeddings": 256}}


def byte_level_tokenizer(vocab: int = VOCAB):
    """A byte-level BPE tokenizer trained on this file, with ``<|endoftext|>`` as its end-of-text token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([Path(__file__).read_text()] * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<pad>")


def save_family(model_type: str, folder: Path, seed: int = 0) -> Path:
    """A random-weight model of ``model_type`` saved in ``folder`` with the tokenizer."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    encoder = model_type in ENCODER
    kwargs = (ENCODER if encoder else CAUSAL)[model_type]
    tok = byte_level_tokenizer()
    config = AutoConfig.for_model(model_type, vocab_size=VOCAB, **kwargs, eos_token_id=tok.eos_token_id,
                                  bos_token_id=tok.bos_token_id)
    torch.manual_seed(seed)
    model = (AutoModel if encoder else AutoModelForCausalLM).from_config(config)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
