"""A tiny, deterministic, offline tokenizer for tests (the Hub is unreachable, so no `from_pretrained("gpt2")`).

`build_tiny_tokenizer(out_dir, vocab_size=99)` trains a Metaspace BPE (SentencePiece/Llama style) on a few
built-in sentences with the `tokenizers` library, pads the vocabulary to exactly `vocab_size` with filler
tokens, and saves `tokenizer.json`, `tokenizer_config.json` and `chat_template.jinja`, so the folder
loads with `AutoTokenizer.from_pretrained(out_dir)` in transformers and in vLLM. The exact size matters: a
random model samples any id below its `vocab_size`, and vLLM must be able to detokenize every one of them.

Special ids match the tiny configs in `tests/helpers/tiny.py`: pad 0, bos 1, eos 2 (`unk` is 3). Encoding
prepends `<s>` like Llama. A minimal chat template is set so chat endpoints work too.

Example:
    tok = build_tiny_tokenizer(tmp_path, vocab_size=99)
    config = tiny_config(vocab_size=99)          # pad/bos/eos 0/1/2 already
    model.save_pretrained(tmp_path)               # tokenizer and model side by side
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)  # ids 0, 1, 2, 3
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(4)

CORPUS = (
    "The quick brown fox jumps over the lazy dog.",
    "A mixture of experts routes every token to a few expert networks.",
    "Each expert is a small feed forward network; the router picks the top k of them.",
    "Hello world! This is a tiny tokenizer for tests that run on the CPU.",
    "Shall I compare thee to a summer's day? Thou art more lovely and more temperate.",
    "To be, or not to be, that is the question.",
    "Numbers 0 1 2 3 4 5 6 7 8 9 and punctuation , . ; : ! ? ' \" ( ) - appear too.",
    "Once upon a time there was a model that learned to count: one, two, three, four, five.",
)

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def _train(vocab_size: int, corpus: tuple[str, ...]) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        show_progress=False,
        min_frequency=1,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return tok


def build_tiny_tokenizer(
    out_dir: str | Path,
    vocab_size: int = 99,
    *,
    corpus: tuple[str, ...] | list[str] | None = None,
) -> PreTrainedTokenizerFast:
    """Train, pad to `vocab_size`, save to `out_dir` and return a `PreTrainedTokenizerFast`.

    Args:
        out_dir: folder to write the tokenizer files into (created if missing).
        vocab_size: exact size of the result (`len(tokenizer) == vocab_size`); at least the number of
            special tokens plus the corpus' distinct characters (about 70 for the built-in corpus).
        corpus: training sentences; defaults to `CORPUS`.

    Returns:
        The tokenizer as loaded back from `out_dir`, so what the test uses is what was saved.
    """
    corpus = tuple(corpus) if corpus is not None else CORPUS
    tok = _train(vocab_size, corpus)
    base = tok.get_vocab_size(with_added_tokens=True)
    if base > vocab_size:
        # The BPE trainer keeps the whole alphabet even past vocab_size.
        raise ValueError(
            f"vocab_size={vocab_size} is smaller than the corpus alphabet plus special tokens ({base}); "
            "use a larger vocab_size or a smaller corpus"
        )
    # Fillers make every id below vocab_size decodable (a random model samples them all).
    tok.add_tokens([f"<extra_{i}>" for i in range(vocab_size - base)])
    assert tok.get_vocab_size(with_added_tokens=True) == vocab_size
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, BOS_ID)]
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        chat_template=CHAT_TEMPLATE,
        model_max_length=4096,
    ).save_pretrained(out)
    return PreTrainedTokenizerFast.from_pretrained(out)
