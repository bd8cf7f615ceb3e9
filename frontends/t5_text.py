"""The T5 text encoder of text-to-image families (Infinity: flan-t5-xl), from a local directory only.

``transformers`` is an optional dependency (the ``dev`` extra has it); nothing is ever downloaded:
the directory must hold the tokenizer files and the encoder's ``config.json`` + weights
(``save_pretrained`` layout). Safetensors or ``weights_only`` loading is transformers' own.
"""
from __future__ import annotations

from pathlib import Path

import torch

from core.errors import UserError


class T5TextEncoder:
    """Prompts -> (T5 last hidden states ``[B, max_length, C]``, attention mask ``[B, max_length]``),
    padded to ``max_length`` as the official ``encode_prompt`` (``padding='max_length'``, truncation)."""

    def __init__(self, directory: str | Path, max_length: int):
        directory = Path(directory)
        if not directory.is_dir():
            raise UserError(f"--text-encoder {directory}: not a directory (a T5 encoder saved with save_pretrained)")
        try:
            from transformers import AutoTokenizer, T5EncoderModel
            from transformers.utils import logging as hf_logging
        except ImportError:
            raise UserError("the T5 text encoder needs the transformers package: pip install transformers") from None
        hf_logging.disable_progress_bar()  # our tools print their own progress; a bar per load clutters it
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
            self.model = T5EncoderModel.from_pretrained(directory, local_files_only=True).float().eval()
        except (OSError, ValueError) as e:
            raise UserError(f"--text-encoder {directory}: cannot load a T5 tokenizer and encoder: "
                            f"{str(e).splitlines()[0]}") from None
        self.directory, self.max_length = directory, max_length

    @property
    def channels(self) -> int:
        return self.model.config.d_model

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if not prompts or any(not p.strip() for p in prompts):
            raise UserError("every prompt must be a non-empty text")
        tokens = self.tokenizer(list(prompts), max_length=self.max_length, padding="max_length", truncation=True,
                                return_tensors="pt")
        device = next(self.model.parameters()).device
        ids, mask = tokens.input_ids.to(device), tokens.attention_mask.to(device)
        if not bool(mask.any(dim=1).all()):
            raise UserError("a prompt encodes to no tokens")
        return self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float(), mask.bool()


def read_prompts(path: str | Path) -> list[str]:
    """Prompts of a text file: one per line, blank lines and lines starting with '#' ignored."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise UserError(f"--prompts {path}: {e.strerror or e}") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise UserError(f"--prompts {path}: no prompts (one per line)")
    return prompts
