"""Summarization through a causal LM's own head: `prompt(document) + summary + EOS`, with the loss on
the summary tokens only. No distributed code here.

    fmt = PromptFormat(tokenizer, "Summarize ...\\n\\n{text}\\n\\nSummary:")
    ids, labels = fmt.training_example(document_ids, summary_ids)   # labels are -100 on the prompt
    batch = fmt.generation_batch([document_ids, ...])               # left-padded prompts
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

IGNORE = -100  # label value the loss skips (Hugging Face convention)


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
        longest = max(len(ids) for ids, _ in pairs)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(pairs), longest), pad, dtype=torch.long)
        labels = torch.full((len(pairs), longest), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(pairs), longest), dtype=torch.long)
        for i, (ids, lab) in enumerate(pairs):
            input_ids[i, :len(ids)] = torch.tensor(ids)
            labels[i, :len(lab)] = torch.tensor(lab)
            mask[i, :len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}

    def generation_batch(self, documents: list[list[int]]) -> dict[str, torch.Tensor]:
        """Left-padded prompts, so every row's next token follows its own last prompt token."""
        prompts = [self.prompt(d) for d in documents]
        longest = max(map(len, prompts))
        input_ids = torch.full((len(prompts), longest), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), longest), dtype=torch.long)
        for i, ids in enumerate(prompts):
            input_ids[i, longest - len(ids):] = torch.tensor(ids)
            mask[i, longest - len(ids):] = 1
        return {"input_ids": input_ids, "attention_mask": mask}
