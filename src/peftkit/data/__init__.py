"""Datasets: file formats, built-in tasks, chat-template encoding with loss masks, batching."""
