"""The toy model zoo: a small Llama base, skill experts fine-tuned from it, a distractor and a multi-task reference,
all trained here on CPU from a seed (`evomerge zoo build DIR`). build.py has the recipe, skills.py the skills."""
