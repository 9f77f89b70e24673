"""A preflight check of a tokenizer against the tasks' prompts: does decode(encode(prompt)) give the prompt back?

A tokenizer that silently drops or changes characters (transformers may load its own tokenizer class for a model's
`model_type`, and some drop spaces) makes every model score near zero with no other hint.
"""

from __future__ import annotations

from typing import Mapping


def round_trip_problems(tokenizer, tasks: Mapping[str, object], docs: int = 8) -> list[str]:
    """One line per lm-eval task (name -> Task) whose first `docs` prompts do not survive the round trip."""
    problems = []
    for name, task in tasks.items():
        eval_docs = task.eval_docs
        for i in range(min(docs, len(eval_docs))):
            prompt = task.doc_to_text(eval_docs[i])
            if not isinstance(prompt, str):
                continue
            back = tokenizer.decode(tokenizer.encode(prompt, add_special_tokens=False))
            if back.strip() != prompt.strip():
                problems.append(f"task {name}: the tokenizer does not give its prompts back ({prompt!r} -> {back!r}); "
                                "scores will mean little: check the model's tokenizer files and tokenizer_class")
                break
    return problems
