"""Datasets: file formats, built-in tasks, chat-template encoding with loss masks, batching."""

from .batching import collate, length_grouped_batches, padding_waste
from .encode import IGNORE_INDEX, Encoded, EncodeStats, encode, encode_all, encode_prompt
from .example import Example, Message
from .files import dataset_hash, load_examples, split_examples

__all__ = [
    "IGNORE_INDEX",
    "EncodeStats",
    "Encoded",
    "Example",
    "Message",
    "collate",
    "dataset_hash",
    "encode",
    "encode_all",
    "encode_prompt",
    "length_grouped_batches",
    "load_examples",
    "padding_waste",
    "split_examples",
]
