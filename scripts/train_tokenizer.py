"""Train tinyllama-fm's byte-level BPE tokenizer on the corpus's train split (CPU, seconds).

    python scripts/train_tokenizer.py
"""

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from slimtorch.zoo.data import text_corpus
from slimtorch.zoo.lm_data import SPECIAL_TOKENS, TOKENIZER_FILE


def main(vocab_size: int = 4096) -> None:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    docs = [t for _, t in text_corpus("train").documents]
    tok.train_from_iterator(docs, trainer=trainer)
    TOKENIZER_FILE.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(TOKENIZER_FILE))
    print(f"wrote {TOKENIZER_FILE} ({tok.get_vocab_size()} tokens)")


if __name__ == "__main__":
    main()
