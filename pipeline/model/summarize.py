"""How summarization examples are laid out for each backbone kind. No distributed code here.

- causal LM (`PromptFormat`): `prompt(document) + summary + EOS` through the LM's own head, with the
  loss on the summary tokens only;
- encoder (task decoder with cross-attention) and encoder-decoder (`Seq2SeqFormat`): the document
  goes to the encoder, the summary + EOS are the decoder's labels.

    fmt = PromptFormat(tokenizer, "Summarize ...\\n\\n{text}\\n\\nSummary:")
    ids, labels = fmt.training_example(document_ids, summary_ids)   # labels are -100 on the prompt
    batch = fmt.generation_batch([document_ids, ...])               # left-padded prompts
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

IGNORE = -100  # label value the loss skips (Hugging Face convention)


def pad(rows: list[list[int]], value: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ids -> (padded tensor, mask of real positions); right-padded unless `left`. Used for every
    batch the project builds (classification inputs, prompts, encoder inputs, labels)."""
    longest = max(map(len, rows))
    ids = torch.full((len(rows), longest), value, dtype=torch.long)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, row in enumerate(rows):
        cols = slice(longest - len(row), longest) if left else slice(0, len(row))
        ids[i, cols] = torch.tensor(row, dtype=torch.long)
        mask[i, cols] = 1
    return ids, mask


@dataclass
class PromptFormat:
    tokenizer: object
    template: str
    prefix: list[int] = field(init=False)
    suffix: list[int] = field(init=False)

    def __post_init__(self):
        if "{text}" not in self.template:
            raise ValueError(f"prompt template {self.template!r} has no {{text}}")
        before, after = self.template.split("{text}", 1)
        tok = self.tokenizer
        bos = [tok.bos_token_id] if tok.bos_token_id is not None and tok.bos_token_id != tok.eos_token_id else []
        self.prefix = bos + tok(before, add_special_tokens=False)["input_ids"]
        self.suffix = tok(after, add_special_tokens=False)["input_ids"]

    @property
    def eos(self) -> int:
        return self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else self.tokenizer.sep_token_id

    def prompt(self, document_ids: list[int]) -> list[int]:
        return self.prefix + list(document_ids) + self.suffix

    def training_example(self, document_ids: list[int], summary_ids: list[int]) -> tuple[list[int], list[int]]:
        prompt = self.prompt(document_ids)
        target = list(summary_ids) + [self.eos]
        return prompt + target, [IGNORE] * len(prompt) + target

    def training_batch(self, documents: list[list[int]], summaries: list[list[int]]) -> dict[str, torch.Tensor]:
        """Right-padded inputs, attention mask and labels (-100 on prompt and padding)."""
        pairs = [self.training_example(d, s) for d, s in zip(documents, summaries)]
        input_ids, mask = pad([ids for ids, _ in pairs], self.tokenizer.pad_token_id)
        labels, _ = pad([lab for _, lab in pairs], IGNORE)
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}

    def generation_batch(self, documents: list[list[int]]) -> dict[str, torch.Tensor]:
        """Left-padded prompts, so every row's next token follows its own last prompt token."""
        input_ids, mask = pad([self.prompt(d) for d in documents], self.tokenizer.pad_token_id, left=True)
        return {"input_ids": input_ids, "attention_mask": mask}


@dataclass
class Seq2SeqFormat:
    """Encoder input = the document with the tokenizer's special tokens; labels = summary + EOS."""

    tokenizer: object
    prefix: list[int] = field(init=False)
    suffix: list[int] = field(init=False)

    def __post_init__(self):
        # The special tokens the tokenizer puts around one text ([CLS] … [SEP], … </s>), found by probing.
        full = self.tokenizer("summary")["input_ids"]
        core = self.tokenizer("summary", add_special_tokens=False)["input_ids"]
        start = next(i for i in range(len(full)) if full[i:i + len(core)] == core)
        self.prefix, self.suffix = full[:start], full[start + len(core):]

    @property
    def eos(self) -> int:
        return self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else self.tokenizer.sep_token_id

    def encoder_ids(self, document: list[int]) -> list[int]:
        return self.prefix + list(document) + self.suffix

    def _encoder_batch(self, documents: list[list[int]]) -> dict[str, torch.Tensor]:
        input_ids, mask = pad([self.encoder_ids(d) for d in documents], self.tokenizer.pad_token_id)
        return {"input_ids": input_ids, "attention_mask": mask}

    def training_batch(self, documents: list[list[int]], summaries: list[list[int]]) -> dict[str, torch.Tensor]:
        batch = self._encoder_batch(documents)
        labels, _ = pad([list(s) + [self.eos] for s in summaries], IGNORE)
        return {**batch, "labels": labels}

    def generation_batch(self, documents: list[list[int]]) -> dict[str, torch.Tensor]:
        return self._encoder_batch(documents)


def summary_format(kind: str, tokenizer, prompt: str | None):
    """The layout for a backbone kind: `causal`, `encoder` or `seq2seq`."""
    if kind == "causal":
        return PromptFormat(tokenizer, prompt or "{text}")
    return Seq2SeqFormat(tokenizer)
