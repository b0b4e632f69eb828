"""Train the small byte-level BPE tokenizer of the embedded example, deterministically.

The tokenizer is trained with the ``tokenizers`` library on the given texts and saved in the
Hugging Face layout (``tokenizer.json``, and ``tokenizer_config.json`` with the special tokens
and the chat template) that ``transformers.AutoTokenizer.from_pretrained`` loads. The
same texts, vocabulary size and library versions always give the same bytes.

Usage:
    python examples/example_tokenizer.py OUTPUT_FOLDER    # trains on elastic's calibration text
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

VOCAB_SIZE = 4096
UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = [UNK, BOS, EOS, PAD]  # ids 0, 1, 2, 3
# One turn per message: "<s>role\ncontent</s>\n"; a generation prompt opens an assistant turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<s>' + message['role'] + '\n' + message['content'] + '</s>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<s>assistant\n' }}{% endif %}"
)


def train_tokenizer(texts: list[str], vocab_size: int, folder: Path) -> None:
    """Train a byte-level BPE tokenizer on ``texts`` and save it into ``folder``.

    Args:
        texts: Training documents, used in order.
        vocab_size: Vocabulary size including the 256 byte symbols and the four special
            tokens ``<unk>``, ``<s>``, ``</s>``, ``<pad>`` (ids 0 to 3).
        folder: Output folder, created if missing; existing tokenizer files are replaced.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        chat_template=CHAT_TEMPLATE,
        model_max_length=4096,
    )
    folder.mkdir(parents=True, exist_ok=True)
    # The template goes into tokenizer_config.json, where loaders older than transformers 5 look for it.
    wrapped.save_pretrained(folder, save_jinja_files=False)

    # transformers 5 names its own class (TokenizersBackend) and backend here; the class name
    # PreTrainedTokenizerFast loads the same tokenizer in transformers 4 and 5.
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config.pop("backend", None)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="Folder to write the tokenizer files into.")
    parser.add_argument("--vocab-size", type=int, default=VOCAB_SIZE, help="Vocabulary size, special tokens included.")
    args = parser.parse_args()

    from elastic_cli.quantize.calib_data import load_texts

    train_tokenizer(load_texts(None), args.vocab_size, args.folder)
    print(f"wrote a {args.vocab_size}-token tokenizer to {args.folder}")


if __name__ == "__main__":
    main()
