"""Calibration text: load documents and cut them into token windows with the checkpoint's tokenizer.

Input formats, chosen by file suffix:

- ``.jsonl`` (or ``.ndjson``): one JSON object per line, with either ``text`` (a string) or chat
  ``messages`` (a list of ``{"role": ..., "content": ...}`` objects). Blank lines are skipped.
  Messages are rendered with the tokenizer's chat template when it has one; without a template
  (or without a tokenizer) each message becomes a ``role: content`` line.
- anything else: plain UTF-8 text, documents separated by blank lines.

With no file, the text shipped with elastic is used: docstrings of the Python standard library
(``elastic_cli/data/calibration.txt``, written by ``examples/make_calibration_text.py``).
"""

from __future__ import annotations

import json
import logging
import re
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from elastic_cli.errors import CheckpointError, UsageError

log = logging.getLogger(__name__)

JSONL_SUFFIXES = (".jsonl", ".ndjson")
DEFAULT_TEXT = ("data", "calibration.txt")  # package data of elastic_cli
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_BLANK_LINES = re.compile(r"\n[ \t]*\n")
_FIX = "pass --calib-data a UTF-8 .txt file, or .jsonl lines with 'text' or 'messages'; omit it for the built-in text"


def check_file(path: Path) -> None:
    """Raise :class:`UsageError` unless the calibration data ``path`` is a regular file."""
    if not path.is_file():
        problem = "is a folder" if path.is_dir() else "not found"
        raise UsageError(f"calibration data {path} {problem}", _FIX)


def load_texts(path: Path | None, tokenizer: Any = None) -> list[str]:
    """Read calibration documents from a file, or the built-in text when ``path`` is ``None``.

    Args:
        path: A plain text or JSONL file (see the module docstring), or ``None``.
        tokenizer: A transformers tokenizer whose chat template renders JSONL ``messages``;
            ``None`` renders them as ``role: content`` lines.

    Returns:
        The documents in file order, each non-empty.

    Raises:
        UsageError: If the file is missing, unreadable, empty, or a JSONL line is invalid.
    """
    if path is None:
        default = resources.files("elastic_cli").joinpath(DEFAULT_TEXT[0]).joinpath(DEFAULT_TEXT[1])
        text = default.read_text(encoding="utf-8")
        return _split_documents(text)

    path = Path(path)
    check_file(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise UsageError(f"calibration data {path} is not UTF-8 text (byte {error.start})", _FIX) from error
    except OSError as error:
        raise UsageError(f"cannot read calibration data {path}: {error.strerror or error}", _FIX) from error

    if path.suffix.lower() in JSONL_SUFFIXES:
        documents = _jsonl_documents(path, text, tokenizer)
    else:
        documents = _split_documents(text)
    if not documents:
        raise UsageError(f"calibration data {path} contains no text", _FIX)
    return documents


def _split_documents(text: str) -> list[str]:
    documents = (document.strip() for document in _BLANK_LINES.split(text.replace("\r\n", "\n")))
    return [document for document in documents if document]


def _jsonl_documents(path: Path, text: str, tokenizer: Any) -> list[str]:
    documents = []
    # split("\n"), not splitlines(): JSON strings may contain U+2028, which splitlines() breaks on.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise UsageError(f"{path} line {number} is not valid JSON ({error.msg})", _FIX) from error
        document = _record_text(record, f"{path} line {number}", tokenizer)
        if document.strip():
            documents.append(document)
    return documents


def _record_text(record: Any, where: str, tokenizer: Any) -> str:
    if isinstance(record, dict) and isinstance(record.get("text"), str):
        return record["text"]
    if isinstance(record, dict) and "messages" in record:
        messages = record["messages"]
        valid = isinstance(messages, list) and all(_is_message(message) for message in messages)
        if not valid or not messages:
            raise UsageError(f"{where}: 'messages' must be a non-empty list of {{role, content}} string objects", _FIX)
        from jinja2 import TemplateError

        try:
            return render_messages(messages, tokenizer)
        except TemplateError as error:
            message = f"{where}: the tokenizer's chat template rejected these messages: {error}"
            raise UsageError(message, _FIX) from error
    raise UsageError(f"{where} has neither a 'text' string nor 'messages'", _FIX)


def _is_message(message: Any) -> bool:
    if not isinstance(message, dict):
        return False
    return isinstance(message.get("role"), str) and isinstance(message.get("content"), str)


def render_messages(messages: list[dict[str, str]], tokenizer: Any = None) -> str:
    """Render a chat as text: with the tokenizer's chat template, else as ``role: content`` lines."""
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return "\n".join(f"{message['role']}: {message['content']}" for message in messages)


def load_tokenizer(folder: Path) -> Any:
    """Load a checkpoint's own tokenizer with ``transformers.AutoTokenizer``.

    Raises:
        CheckpointError: If the folder has no tokenizer files or transformers cannot load them.
    """
    from transformers import AutoTokenizer

    hint = "calibration tokenizes text with the checkpoint's own tokenizer; copy its tokenizer files into the folder"
    if not any((Path(folder) / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointError(f"{folder} has no tokenizer ({', '.join(TOKENIZER_FILES)})", hint)
    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as error:
        raise CheckpointError(f"cannot load the tokenizer in {folder}: {error}", hint) from error


def pack_windows(texts: list[str], tokenizer: Any, max_windows: int, seq_len: int) -> tuple[torch.Tensor, int]:
    """Tokenize documents in order and cut the token stream into at most ``max_windows`` windows.

    Each document is encoded without added special tokens and followed by the tokenizer's EOS
    token when it has one, as documents are packed in pretraining. Encoding stops once
    ``max_windows * seq_len`` tokens are collected; the tail shorter than a window is dropped.

    Returns:
        Token ids ``[windows, seq_len]`` int64 (``windows`` may be 0), and the number of tokens
        encoded.
    """
    needed = max_windows * seq_len
    eos = getattr(tokenizer, "eos_token_id", None)
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
        if len(ids) >= needed:
            break
    windows = min(max_windows, len(ids) // seq_len)
    return torch.tensor(ids[: windows * seq_len], dtype=torch.int64).reshape(windows, seq_len), len(ids)


def tokenize(texts: list[str], tokenizer: Any, samples: int, seq_len: int) -> torch.Tensor:
    """Tokenize calibration documents into ``samples`` windows, packed by :func:`pack_windows`.

    Args:
        texts: Documents from :func:`load_texts`.
        tokenizer: The checkpoint's transformers tokenizer.
        samples: Windows requested.
        seq_len: Tokens per window.

    Returns:
        Token ids, ``[windows, seq_len]`` int64, where ``windows`` is ``samples``, or fewer
        (at least 1, with a warning) when the text is too short.

    Raises:
        UsageError: If ``samples`` or ``seq_len`` is below 1, or the text contains fewer than
            ``seq_len`` tokens.
    """
    if samples < 1 or seq_len < 1:
        raise UsageError(f"calibration needs at least 1 sample of at least 1 token, got {samples} x {seq_len}")
    token_ids, tokens = pack_windows(texts, tokenizer, samples, seq_len)
    windows = token_ids.shape[0]
    if windows == 0:
        raise UsageError(
            f"the calibration text has {tokens} tokens, fewer than one window of {seq_len}",
            "pass more text with --calib-data or a smaller --calib-seq-len",
        )
    if windows < samples:
        log.warning("the calibration text fills %d of %d requested samples of %d tokens", windows, samples, seq_len)
    log.info("tokenized %d calibration sample(s) of %d tokens", windows, seq_len)
    return token_ids
